"""Every emulator response validates against its operation's schema in Parallel's published
OpenAPI spec, and the requests the SDK and enrich's client send validate against the request
schemas. The walker covers every task operation the emulator serves, plainly and with every
switchable behaviour on (`--behaviours all`).

`parse_sse` and `check_response` are shared with the behaviour tests (test_emulator_switches.py)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from parallel import Parallel

from tests.conftest import OPENAPI, need_shared

SCHEMA = {
    "type": "json",
    "json_schema": {
        "type": "object",
        "additionalProperties": False,
        "required": ["industry"],
        "properties": {"industry": {"type": ["string", "null"]}},
    },
}


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


# Statuses the reference lists for every endpoint (parallel-task-api.md section 8) though the spec
# declares them per operation only where a handler raises them: the `connections` behaviour sends
# 503 anywhere and 429 on add-runs; their bodies must still be the spec's ErrorResponse.
GENERIC_STATUSES = {429, 503}


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Events of an SSE body as the WHATWG event-stream rules read them: any line ending, comments
    skipped, one optional space after the colon, data lines joined with newlines, events without
    data not dispatched, and an unfinished event at the end of the body discarded."""
    lines = re.split(r"\r\n|\r|\n", raw.decode("utf-8", errors="replace"))[:-1]  # the last piece is unfinished
    events: list[dict[str, Any]] = []
    data: list[str] = []
    kind, last_id = "", None
    for line in lines:
        if not line:
            if data:
                events.append({"event": kind or "message", "data": "\n".join(data), "id": last_id})
            data, kind = [], ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value
        elif name == "id":
            last_id = value
    return events


def check_response(
    spec: dict[str, Any],
    resp: httpx.Response,
    body: bytes | None = None,
    *,
    plain_sse: bool = True,
    generic: bool = False,
) -> str:
    """Validate one response (JSON or SSE) against the spec; return the operation's path template.

    `body`: the bytes read when the stream ended early (cut). `plain_sse`: also hold the stream to
    the SDK-safe framing (no `id:` lines, at least one event). `generic`: accept GENERIC_STATUSES
    on operations that do not declare them, with an ErrorResponse body.
    """
    template, op = _operation(spec, resp.request.method, resp.request.url.path)
    declared = op["responses"].get(str(resp.status_code))
    if declared is None and generic and resp.status_code in GENERIC_STATUSES:
        declared = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    assert declared is not None, f"{resp.request.method} {template} has no {resp.status_code} response in the spec"
    content = declared.get("content", {})
    raw = resp.content if body is None else body
    if resp.headers["content-type"].startswith("text/event-stream"):
        validator = _validator(spec, content["text/event-stream"]["schema"])
        events = parse_sse(raw)
        if plain_sse:
            assert events, "empty stream"
            assert not any(line.startswith(b"id:") for line in raw.splitlines())
        for event in events:
            validator.validate(json.loads(event["data"]))
    else:
        _validator(spec, content["application/json"]["schema"]).validate(json.loads(raw))
    return template


def fetch(c: httpx.Client, method: str, path: str, **kw: Any) -> tuple[httpx.Response | None, bytes]:
    """One request, reading the body as far as it goes: (response or None if none came, bytes read)."""
    chunks: list[bytes] = []
    try:
        with c.stream(method, path, **kw) as resp:
            try:
                for chunk in resp.iter_raw():
                    chunks.append(chunk)
            except httpx.TransportError:
                pass  # cut mid-body: validate what arrived
            return resp, b"".join(chunks)
    except httpx.TransportError:
        return None, b""


class _Reply:
    """What the walker needs of a response whose body may have been read by `fetch`."""

    def __init__(self, resp: httpx.Response, body: bytes):
        self.status_code, self.body = resp.status_code, body

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.mark.parametrize("behaviours", ["", "all"])
def test_every_task_operation_conforms(spec: dict[str, Any], emulator, behaviours: str) -> None:
    """Each task operation, each status the emulator can give; with `all`, transient replies
    (503, injected 429, dropped connections) are validated too, then the call is repeated."""
    emu = emulator(time_scale=0.0, credit_usd=0.01, rate_limit=0, behaviours=behaviours, seed=3)
    seen: set[tuple[str, str, int]] = set()
    h = {"x-api-key": "k"}
    plain = not behaviours
    with httpx.Client(base_url=emu.base_url, headers=h, timeout=30) as c:

        def call(method: str, path: str, retry_on: tuple[int, ...] = (429, 503), **kw: Any) -> _Reply:
            for _ in range(20):
                resp, body = fetch(c, method, path, **kw)
                if resp is None:
                    assert not plain, f"{method} {path}: no response"
                    time.sleep(0.05)
                    continue
                seen.add(
                    (method, check_response(spec, resp, body, plain_sse=plain, generic=not plain), resp.status_code)
                )
                if plain or resp.status_code not in retry_on:
                    return _Reply(resp, body)
            raise AssertionError(f"{method} {path}: no lasting reply in 20 tries")

        run = call(
            "POST",
            "/v1/tasks/runs",
            json={
                "input": {"company": "Apple"},
                "processor": "lite-fast",
                "task_spec": {"output_schema": SCHEMA},
                "metadata": {"a": 1},
            },
        ).json()
        rid = run["run_id"]
        call("GET", f"/v1/tasks/runs/{rid}")
        call("GET", f"/v1/tasks/runs/{rid}/input")
        call("GET", f"/v1/tasks/runs/{rid}/result", params={"timeout": 5})
        call("GET", f"/v1/tasks/runs/{rid}/events")
        call("GET", f"/v1beta/tasks/runs/{rid}/events")
        text = call(
            "POST",
            "/v1/tasks/runs",
            json={"input": "Apple", "processor": "lite", "task_spec": {"output_schema": "A short profile"}},
        ).json()
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
        call(
            "POST",
            "/v1/tasks/runs",
            json={
                "input": "x",
                "processor": "lite",
                "task_spec": {"output_schema": {"json_schema": {"type": "string"}}},
            },
        )
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})  # the credit is now used up
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"})  # 402
        group = call("POST", "/v1/tasks/groups", json={"metadata": {"job": "x"}}).json()
        gid = group["taskgroup_id"]
        call("GET", f"/v1/tasks/groups/{gid}")
        emu.emulator.credit = None
        added = call(
            "POST",
            f"/v1/tasks/groups/{gid}/runs",
            json={
                "inputs": [{"input": {"company": "3M"}, "processor": "base"}, {"input": "IBM", "processor": "base"}],
                "default_task_spec": {"output_schema": SCHEMA},
            },
        ).json()
        call("POST", f"/v1/tasks/groups/{gid}/runs", json={"inputs": [{"input": "x", "processor": "lite"}] * 1001})
        call("GET", f"/v1/tasks/groups/{gid}/runs", params={"include_output": "true", "include_input": "true"})
        call("GET", f"/v1/tasks/groups/{gid}/runs", params={"status": "completed"})
        call("GET", f"/v1/tasks/groups/{gid}/events", params={"timeout": 1})
        call("GET", f"/v1/tasks/groups/{gid}/runs/{added['run_ids'][0]}")
        call("GET", f"/v1/tasks/groups/{gid}/runs/trun_nope")
        call("GET", "/v1/tasks/groups/tgrp_nope/runs")
        call("GET", "/v1/tasks/groups/tgrp_nope/events")
        emu.emulator.config.rate_limit = 1
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"}, retry_on=(503,))
        call("POST", "/v1/tasks/runs", json={"input": "x", "processor": "lite"}, retry_on=(503,))  # 429
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
    sdk.task_run.create(
        input={"company": "Apple"},
        processor="lite",
        task_spec={"output_schema": SCHEMA},
        metadata={"x": "y"},
        source_policy={"include_domains": ["example.com"]},
    )
    g = sdk.task_group.create(metadata={"a": "b"})
    sdk.task_group.add_runs(
        g.taskgroup_id, inputs=[{"input": "x", "processor": "base"}], default_task_spec={"output_schema": SCHEMA}
    )
    sdk.close()
    import asyncio

    from enrich.client import TaskClient

    async def ours() -> None:
        client = TaskClient(emu.base_url, "k")
        client._http.event_hooks["request"] = [_async(hook)]
        gid = (await client.create_group({"enrich_job": "j"}))["taskgroup_id"]
        await client.add_runs(
            gid,
            [{"input": {"company": "3M"}, "processor": "lite-fast", "metadata": {"enrich_row": "r", "enrich_try": 1}}],
            {"output_schema": SCHEMA},
        )
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
