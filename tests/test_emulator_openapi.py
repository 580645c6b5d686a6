"""Every emulator response validates against its operation's schema in Parallel's published
OpenAPI spec, and the requests the SDK and enrich's client send validate against the request
schemas. The walker covers every task operation the emulator serves."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from parallel import Parallel

from tests.conftest import OPENAPI, need_shared

SCHEMA = {"type": "json", "json_schema": {"type": "object", "additionalProperties": False, "required": ["industry"],
                                          "properties": {"industry": {"type": ["string", "null"]}}}}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return json.loads(need_shared(OPENAPI).read_text())


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": spec["components"]})


def _operation(spec: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    for template, ops in spec["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if method.lower() in ops and re.match(pattern, path):
            return template, ops[method.lower()]
    raise AssertionError(f"{method} {path} is not in the spec")


def check_response(spec: dict[str, Any], resp: httpx.Response) -> str:
    """Validate one response (JSON or SSE) against the spec; return the operation's path template."""
    template, op = _operation(spec, resp.request.method, resp.request.url.path)
    declared = op["responses"].get(str(resp.status_code))
    assert declared is not None, f"{resp.request.method} {template} has no {resp.status_code} response in the spec"
    content = declared.get("content", {})
    if resp.headers["content-type"].startswith("text/event-stream"):
        schema = content["text/event-stream"]["schema"]
        validator = _validator(spec, schema)
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events, "empty stream"
        assert not any(line.startswith("id:") for line in resp.text.splitlines())
        for data in events:
            validator.validate(json.loads(data))
    else:
        _validator(spec, content["application/json"]["schema"]).validate(resp.json())
    return template


def test_every_task_operation_conforms(spec: dict[str, Any], emulator) -> None:
    emu = emulator(time_scale=0.0, credit_usd=0.01, rate_limit=0)
    seen: set[tuple[str, str, int]] = set()
    h = {"x-api-key": "k"}
    with httpx.Client(base_url=emu.base_url, headers=h, timeout=30) as c:
        def call(method: str, path: str, **kw: Any) -> httpx.Response:
            resp = c.request(method, path, **kw)
            seen.add((method, check_response(spec, resp), resp.status_code))
            return resp

        run = call("POST", "/v1/tasks/runs", json={"input": {"company": "Apple"}, "processor": "lite-fast",
                                                   "task_spec": {"output_schema": SCHEMA}, "metadata": {"a": 1}}).json()
        rid = run["run_id"]
        call("GET", f"/v1/tasks/runs/{rid}")
        call("GET", f"/v1/tasks/runs/{rid}/input")
        call("GET", f"/v1/tasks/runs/{rid}/result", params={"timeout": 5})
        call("GET", f"/v1/tasks/runs/{rid}/events")
        call("GET", f"/v1beta/tasks/runs/{rid}/events")
        text = call("POST", "/v1/tasks/runs", json={"input": "Apple", "processor": "lite",
                                                    "task_spec": {"output_schema": "A short profile"}}).json()
        call("GET", f"/v1/tasks/runs/{text['run_id']}/result")
        call("GET", "/v1/tasks/runs/trun_nope")
        call("GET", "/v1/tasks/runs/trun_nope/result")
        call("GET", "/v1/tasks/runs/trun_nope/input")
        call("GET", "/v1/tasks/runs/trun_nope/events")
        c.headers.pop("x-api-key")
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})
        call("GET", f"/v1/tasks/runs/{rid}")
        c.headers["x-api-key"] = "k"
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "nope"})
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite",
                                             "task_spec": {"output_schema": {"json_schema": {"type": "string"}}}})
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})   # the credit is now used up
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})   # 402
        group = call("POST", "/v1/tasks/groups", json={"metadata": {"job": "x"}}).json()
        gid = group["taskgroup_id"]
        call("GET", f"/v1/tasks/groups/{gid}")
        emu.emulator.credit = None
        added = call("POST", f"/v1/tasks/groups/{gid}/runs", json={
            "inputs": [{"input": {"company": "3M"}, "processor": "base"}, {"input": "IBM", "processor": "base"}],
            "default_task_spec": {"output_schema": SCHEMA}}).json()
        call("POST", f"/v1/tasks/groups/{gid}/runs", json={"inputs": [{"input": "x", "processor": "lite"}] * 1001})
        call("GET", f"/v1/tasks/groups/{gid}/runs", params={"include_output": "true", "include_input": "true"})
        call("GET", f"/v1/tasks/groups/{gid}/runs", params={"status": "completed"})
        call("GET", f"/v1/tasks/groups/{gid}/events", params={"timeout": 1})
        call("GET", f"/v1/tasks/groups/{gid}/runs/{added['run_ids'][0]}")
        call("GET", f"/v1/tasks/groups/{gid}/runs/trun_nope")
        call("GET", "/v1/tasks/groups/tgrp_nope/runs")
        call("GET", "/v1/tasks/groups/tgrp_nope/events")
        emu.emulator.config.rate_limit = 1
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})  # 429
    ops = {(m, t) for m, t, _ in seen}
    task_ops = {(m.upper(), t) for t, o in spec["paths"].items() if "/tasks/" in t for m in o}
    assert task_ops <= ops, f"operations not exercised: {task_ops - ops}"
    statuses = {s for _, _, s in seen}
    assert {200, 202, 401, 402, 403, 404, 422, 429} <= statuses


def test_failed_run_result_is_404_with_error_on_run(spec: dict[str, Any], emulator) -> None:
    emu = emulator(fail_rate=1.0)
    with httpx.Client(base_url=emu.base_url, headers={"x-api-key": "k"}, timeout=10) as c:
        rid = c.post("/v1/tasks/runs", json={"input": "x", "processor": "lite"}).json()["run_id"]
        res = c.get(f"/v1/tasks/runs/{rid}/result")
        assert res.status_code == 404
        check_response(spec, res)
        run = c.get(f"/v1/tasks/runs/{rid}")
        check_response(spec, run)
        assert run.json()["status"] == "failed" and run.json()["error"]["message"]


def test_requests_from_sdk_and_enrich_conform(spec: dict[str, Any], emulator) -> None:
    """Request bodies the official SDK and enrich's client send validate against the request schemas."""
    emu = emulator()
    bodies: list[tuple[str, str, Any]] = []

    def hook(request: httpx.Request) -> None:
        if request.method == "POST":
            bodies.append((request.method, request.url.path, json.loads(request.content or b"{}")))

    sdk = Parallel(api_key="k", base_url=emu.base_url, http_client=httpx.Client(event_hooks={"request": [hook]}))
    sdk.task_run.create(input={"company": "Apple"}, processor="lite", task_spec={"output_schema": SCHEMA},
                        metadata={"x": "y"}, source_policy={"include_domains": ["example.com"]})
    g = sdk.task_group.create(metadata={"a": "b"})
    sdk.task_group.add_runs(g.taskgroup_id, inputs=[{"input": "x", "processor": "base"}],
                            default_task_spec={"output_schema": SCHEMA})
    sdk.close()
    import asyncio

    from enrich.client import TaskClient

    async def ours() -> None:
        client = TaskClient(emu.base_url, "k")
        client._http.event_hooks["request"] = [_async(hook)]
        gid = (await client.create_group({"enrich_job": "j"}))["taskgroup_id"]
        await client.add_runs(gid, [{"input": {"company": "3M"}, "processor": "lite-fast",
                                     "metadata": {"enrich_row": "r", "enrich_try": 1}}], {"output_schema": SCHEMA})
        await client.aclose()

    asyncio.run(ours())
    assert len(bodies) == 5
    for method, path, body in bodies:
        _, op = _operation(spec, method, path)
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        _validator(spec, schema).validate(body)


def _async(fn: Any) -> Any:
    async def wrapper(request: httpx.Request) -> None:
        fn(request)
    return wrapper
