"""Emulator behaviour over real HTTP: knowledge answers, time, limits, each fault kind, ledger."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest

from enrich.emulator.core import parse_faults
from enrich.emulator.knowledge import Knowledge, coerce, norm_name, norm_value

H = {"x-api-key": "k"}
SCHEMA = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headquarters_location"],
            "properties": {"headquarters_location": {"type": ["string", "null"]}},
        },
    }
}


def client(emu, timeout: float = 10) -> httpx.Client:
    return httpx.Client(base_url=emu.base_url, headers=H, timeout=timeout)


def create(c: httpx.Client, **kw) -> httpx.Response:
    return c.post("/v1/tasks/runs", json={"input": {"company": "Apple"}, "processor": "lite-fast", **kw})


def ledger(emu) -> list[dict]:
    return httpx.get(emu.base_url + "/_emulator/ledger").json()


def test_names_and_values_normalise() -> None:
    assert norm_name("Headquarters Location") == "headquarters_location"
    assert norm_value("  A.O. Smith ") == norm_value("a o smith")
    assert coerce("2013 (1888)", {"type": ["integer", "null"]}) == 2013
    assert coerce("a; b", {"type": "array", "items": {"type": "string"}}) == ["a", "b"]
    assert coerce("yes", {"type": "boolean"}) is True


def test_knowledge_matches_string_and_object_inputs() -> None:
    k = Knowledge([{"company": "3M", "Headquarters Location": "Saint Paul, Minnesota"}], "company")
    assert k.match("3m") == k.match({"company": " 3M "}) == k.match({"name": "3M"})
    text = k.answer("3M", {"type": "text", "description": "profile"})
    assert text["type"] == "text" and "Saint Paul" in text["content"] and text["basis"][0]["field"] == "output"


def test_latency_band_times_scale(emulator) -> None:
    """lite-fast (10-20 s published) at time_scale 0.01 completes in 0.1-0.2 s."""
    emu = emulator(time_scale=0.01)
    with client(emu) as c:
        run = create(c).json()
        res = c.get(f"/v1/tasks/runs/{run['run_id']}/result", params={"timeout": 5}).json()
    t0 = datetime.fromisoformat(res["run"]["created_at"].rstrip("Z"))
    t1 = datetime.fromisoformat(res["run"]["modified_at"].rstrip("Z"))
    assert 0.1 <= (t1 - t0).total_seconds() <= 0.2


def test_rate_limit_counts_creating_posts_only(emulator) -> None:
    """--rate-limit N: the (N+1)th creating POST in a minute is 429; GETs and group creation are free;
    an add-runs POST of 3 inputs counts once."""
    emu = emulator(rate_limit=3)
    with client(emu) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        assert (
            c.post(
                f"/v1/tasks/groups/{gid}/runs", json={"inputs": [{"input": "a", "processor": "lite"}] * 3}
            ).status_code
            == 200
        )
        rid = create(c).json()["run_id"]
        for _ in range(5):
            assert c.get(f"/v1/tasks/runs/{rid}").status_code == 200
        assert create(c).status_code == 202
        r = create(c)
        assert r.status_code == 429 and r.json()["type"] == "error"
    assert len(ledger(emu)) == 5


def test_credit_reservation_402(emulator) -> None:
    """--credit-usd reserves each active run's price; a run it cannot cover gets 402."""
    emu = emulator(credit_usd=0.012, time_scale=1.0)  # room for two lite runs ($0.005 each)
    with client(emu) as c:
        assert create(c).status_code == 202
        assert create(c).status_code == 202
        r = create(c)
        assert r.status_code == 402 and "credit" in r.json()["error"]["message"].lower()
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        assert (
            c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [{"input": "a", "processor": "lite"}]}).status_code
            == 402
        )
    assert len(ledger(emu)) == 2


@pytest.mark.parametrize("kind,status,created", [("429", 429, False), ("503", 503, False)])
def test_error_faults_create_nothing(emulator, kind: str, status: int, created: bool) -> None:
    emu = emulator(faults=f"{kind}=1")
    with client(emu) as c:
        assert create(c).status_code == status
    assert len(ledger(emu)) == 0


def test_500_fault_sometimes_commits(emulator) -> None:
    """An injected 500 on a create is ambiguous on purpose: some runs exist, some do not."""
    emu = emulator(faults="500=1")
    with client(emu) as c:
        assert all(create(c).status_code == 500 for _ in range(40))
    assert 0 < len(ledger(emu)) < 40


def test_drop_commits_then_closes_without_response(emulator) -> None:
    emu = emulator(faults="drop=1")
    with client(emu) as c, pytest.raises(httpx.RemoteProtocolError, match="without sending"):
        create(c)
    assert len(ledger(emu)) == 1


def test_truncate_sends_2xx_with_cut_body(emulator) -> None:
    emu = emulator(faults="truncate=1")
    with client(emu) as c, pytest.raises(httpx.RemoteProtocolError):
        create(c)
    assert len(ledger(emu)) == 1


def test_slow_holds_the_reply_past_the_client_timeout(emulator) -> None:
    emu = emulator(faults="slow=1,slow_s=3")
    with client(emu, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        create(c)
    assert len(ledger(emu)) == 1


def test_retry_after_header_and_runtime_fault_control(emulator) -> None:
    emu = emulator()
    with client(emu) as c:
        assert c.post("/_emulator/faults", json={"faults": "429=1,retry_after=2"}).status_code == 200
        r = create(c)
        assert r.status_code == 429 and r.headers["retry-after"] == "2.0"
        c.post("/_emulator/faults", json={"faults": ""})
        assert create(c).status_code == 202


def test_ledger_stats_and_reset(emulator) -> None:
    emu = emulator()
    with client(emu) as c:
        run = create(c, metadata={"enrich_row": "r1"}, task_spec=SCHEMA).json()
        rows = c.get("/_emulator/ledger").json()
        assert rows[0]["run_id"] == run["run_id"] and rows[0]["metadata"] == {"enrich_row": "r1"}
        assert rows[0]["input"] == {"company": "Apple"} and rows[0]["price"] == 0.005
        assert set(rows[0]) >= {"taskgroup_id", "processor", "created_at"}
        stats = c.get("/_emulator/stats").json()
        assert stats["requests"]["POST create_run"] == {"202": 1} and stats["creating_posts"] == 1
        c.post("/_emulator/reset")
        assert c.get("/_emulator/ledger").json() == []


def test_validation_rules(emulator) -> None:
    """Schema keyword, root type, metadata limits, 1,000-input cap, unknown processor."""
    emu = emulator()
    bad_kw = {
        "output_schema": {
            "type": "json",
            "json_schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}},
        }
    }
    with client(emu) as c:
        assert create(c, task_spec=bad_kw).status_code == 422
        assert create(c, task_spec={"output_schema": {"json_schema": {"type": "array"}}}).status_code == 422
        assert create(c, metadata={"k" * 17: "v"}).status_code == 422
        assert create(c, metadata={"k": "v" * 513}).status_code == 422
        assert create(c, processor="lite-turbo").status_code == 403
        ok = create(
            c,
            task_spec={
                "output_schema": {"json_schema": {"type": "object", "properties": {"sources": {"type": "string"}}}}
            },
        ).json()
        assert {w["type"] for w in ok["warnings"]} == {"spec_validation_warning"}
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        r = c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [{"input": "a", "processor": "lite"}] * 1001})
        assert r.status_code == 422 and "detail" in r.json()
    assert len(ledger(emu)) == 1


def test_holds_20000_active_runs(emulator) -> None:
    """20 add-runs POSTs of 1,000 keep 20,000 runs active (capacity is measured in `make bench`)."""
    emu = emulator(time_scale=10.0, rate_limit=0)
    with client(emu, timeout=60) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        body = {"inputs": [{"input": {"company": "Apple"}, "processor": "lite"}] * 1000}
        for _ in range(20):
            assert c.post(f"/v1/tasks/groups/{gid}/runs", json=body).status_code == 200
        status = c.get(f"/v1/tasks/groups/{gid}").json()["status"]
        assert status["num_task_runs"] == 20000 and status["is_active"]
        assert c.get("/_emulator/stats").json()["active_runs"] == 20000


def test_fault_spec_parsing() -> None:
    assert parse_faults("429=0.05,drop=0.02") == {"429": 0.05, "drop": 0.02}
    for bad in ("boom=1", "429", "429=2", "429=0.6,500=0.6"):
        with pytest.raises(ValueError):
            parse_faults(bad)
