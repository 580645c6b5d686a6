"""The official `parallel-web` SDK, unchanged, against the emulator over loopback HTTP."""

from __future__ import annotations

import time

import parallel
import pytest
from parallel import Parallel

SCHEMA = {
    "type": "json",
    "json_schema": {
        "type": "object",
        "additionalProperties": False,
        "required": ["headquarters_location", "founded"],
        "properties": {"headquarters_location": {"type": ["string", "null"]}, "founded": {"type": ["integer", "null"]}},
    },
}


def test_single_run_create_result_retrieve_input_events(emulator, sp500) -> None:
    """create -> result -> retrieve -> retrieve_input -> events; 3M answers from the S&P table."""
    emu = emulator(knowledge=str(sp500), knowledge_key="Security", time_scale=0.001)
    client = Parallel(api_key="test-key", base_url=emu.base_url)
    run = client.task_run.create(
        input={"Security": "3M"}, processor="lite-fast", task_spec={"output_schema": SCHEMA}, metadata={"row": "mmm"}
    )
    assert run.status == "queued" and run.run_id.startswith("trun_") and len(run.run_id) == 37
    result = client.task_run.result(run.run_id, api_timeout=30)
    assert result.output.content == {"headquarters_location": "Saint Paul, Minnesota", "founded": 1902}
    basis = {b.field: b for b in result.output.basis}
    assert basis["headquarters_location"].confidence == "high"
    assert basis["headquarters_location"].citations and basis["headquarters_location"].citations[0].url
    got = client.task_run.retrieve(run.run_id)
    assert got.status == "completed" and got.is_active is False and got.metadata == {"row": "mmm"}
    assert client.task_run.retrieve_input(run.run_id).input == {"Security": "3M"}
    events = list(client.task_run.events(run.run_id))
    assert events[0].type == "task_run.state" and events[-1].type == "task_run.state"
    assert events[-1].output is not None and events[-1].output.content["founded"] == 1902
    client.close()


def test_unknown_company_gets_nulls_and_low_confidence(emulator, sp500) -> None:
    emu = emulator(knowledge=str(sp500), knowledge_key="Security")
    client = Parallel(api_key="k", base_url=emu.base_url)
    run = client.task_run.create(
        input={"Security": "Definitely Not A Company"}, processor="base", task_spec={"output_schema": SCHEMA}
    )
    result = client.task_run.result(run.run_id)
    assert result.output.content == {"headquarters_location": None, "founded": None}
    assert {b.confidence for b in result.output.basis} == {"low"}


def test_group_of_1000_runs(emulator) -> None:
    """task_group: create -> add_runs(1,000) -> retrieve until inactive -> get_runs -> events -> retrieve_run."""
    emu = emulator(time_scale=0.002)
    client = Parallel(api_key="k", base_url=emu.base_url)
    group = client.task_group.create(metadata={"job": "t"})
    inputs = [{"input": {"company": "Apple"}, "processor": "lite-fast", "metadata": {"i": i}} for i in range(1000)]
    added = client.task_group.add_runs(group.taskgroup_id, inputs=inputs, default_task_spec={"output_schema": SCHEMA})
    assert len(added.run_ids) == 1000 and added.run_cursor is None
    deadline = time.monotonic() + 60
    while client.task_group.retrieve(group.taskgroup_id).status.is_active:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    events = list(client.task_group.get_runs(group.taskgroup_id, include_output=True))
    assert [e.run.run_id for e in events] == added.run_ids  # input order
    assert [e.run.metadata["i"] for e in events] == list(range(1000))
    assert sum(1 for e in events if e.output is not None and e.run.status == "completed") == 1000
    status_events = [e for e in client.task_group.events(group.taskgroup_id) if e.type == "task_group_status"]
    assert status_events[-1].status.task_run_status_counts == {"completed": 1000}
    one = client.task_group.retrieve_run(added.run_ids[0], task_group_id=group.taskgroup_id)
    assert one.status == "completed"
    more = client.task_group.add_runs(group.taskgroup_id, inputs=inputs[:2])
    assert more.run_cursor == events[-1].event_id  # resume the runs stream right after the first batch
    after = list(client.task_group.get_runs(group.taskgroup_id, last_event_id=more.run_cursor))
    assert [e.run.run_id for e in after] == more.run_ids


def test_typed_errors(emulator) -> None:
    """401/403/404/408/422/429 arrive as the SDK's own exception classes."""
    emu = emulator(time_scale=1.0, rate_limit=4, api_key="right-key")  # every creating POST counts
    bad = Parallel(api_key="wrong-key", base_url=emu.base_url, max_retries=0)
    with pytest.raises(parallel.AuthenticationError):
        bad.task_run.create(input="x", processor="lite")
    client = Parallel(api_key="right-key", base_url=emu.base_url, max_retries=0)
    with pytest.raises(parallel.PermissionDeniedError):
        client.task_run.create(input="x", processor="turbo")
    with pytest.raises(parallel.NotFoundError):
        client.task_run.retrieve("trun_" + "0" * 32)
    run = client.task_run.create(input="Apple", processor="ultra")  # minutes long at time_scale 1
    with pytest.raises(parallel.APIStatusError) as info:
        client.task_run.result(run.run_id, api_timeout=0)
    assert info.value.status_code == 408
    with pytest.raises(parallel.UnprocessableEntityError):
        client.task_run.create(
            input="x",
            processor="lite",
            task_spec={
                "output_schema": {
                    "type": "json",
                    "json_schema": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}},
                }
            },
        )
    client.task_run.create(input="x", processor="lite")
    with pytest.raises(parallel.RateLimitError):
        client.task_run.create(input="y", processor="lite")
