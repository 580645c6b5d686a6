"""client.py against httpx.MockTransport fakes: malformed replies are classified, never crash;
redirects are refused; the key never leaks into errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from enrich.client import StreamEnd, TaskClient, check_base_url
from enrich.errors import ConfigError, OutcomeUnknown, PermanentApiError, TransientApiError

KEY = "sk-CANARY-client-0123456789"


def make(handler: Any) -> TaskClient:
    return TaskClient("http://127.0.0.1:9", KEY, transport=httpx.MockTransport(handler))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _add(client: TaskClient, n: int = 2) -> Any:
    try:
        return await client.add_runs("tgrp_x", [{"input": "a", "processor": "lite"}] * n, None)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "status,body,headers",
    [
        (502, b"<html><body>Bad Gateway</body></html>", {"content-type": "text/html"}),
        (200, b'{"run_ids": ["trun_a", "tru', {"content-type": "application/json"}),
        (200, b'{"status": {}}', {"content-type": "application/json"}),
        (200, b'{"run_ids": ["trun_a"]}', {"content-type": "application/json"}),
        (500, b'{"type":"error","error":{"ref_id":"r","message":"boom"}}', {"content-type": "application/json"}),
    ],
)
def test_malformed_or_ambiguous_add_runs_replies_are_outcome_unknown(status: int, body: bytes, headers: dict) -> None:
    client = make(lambda req: httpx.Response(status, content=body, headers=headers))
    with pytest.raises(OutcomeUnknown):
        run(_add(client))


def test_extra_fields_are_accepted() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "run_ids": ["trun_a", "trun_b"],
                "status": {},
                "run_cursor": None,
                "event_cursor": None,
                "new_field": {"x": 1},
            },
        )

    reply = run(_add(make(handler)))
    assert reply["new_field"] == {"x": 1}


def test_redirects_are_not_followed() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(str(req.url))
        return httpx.Response(302, headers={"location": "https://evil.example/steal"})

    with pytest.raises(PermanentApiError):
        run(_add(make(handler)))
    assert calls == ["http://127.0.0.1:9/v1/tasks/groups/tgrp_x/runs"]


def test_key_sent_in_header_and_never_in_errors() -> None:
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers["x-api-key"])
        return httpx.Response(422, json={"type": "error", "error": {"ref_id": "r", "message": f"bad key {KEY}"}})

    with pytest.raises(PermanentApiError) as info:
        run(_add(make(handler)))
    assert seen == [KEY] and KEY not in str(info.value)


def test_connect_error_on_create_is_safe_to_retry() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(TransientApiError):
        run(_add(make(handler)))


def test_read_timeout_on_create_is_outcome_unknown_but_safe_on_get() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    with pytest.raises(OutcomeUnknown):
        run(_add(make(handler)))

    async def get() -> None:
        c = make(handler)
        try:
            await c.get_run("trun_x")
        finally:
            await c.aclose()

    with pytest.raises(TransientApiError):
        run(get())


def test_result_408_means_not_ready() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.url.params["timeout"] == "0"
        return httpx.Response(408, json={"type": "error", "error": {"ref_id": "r", "message": "still active"}})

    async def go() -> Any:
        c = make(handler)
        try:
            return await c.result("trun_x", 0)
        finally:
            await c.aclose()

    assert run(go()) is None


def test_sse_stream_parses_events_and_skips_pings() -> None:
    body = (
        b": ping\n\nevent: task_run.state\ndata: "
        + json.dumps({"type": "task_run.state", "event_id": "1", "run": {"run_id": "trun_a"}}).encode()
        + b"\n\n: ping\n\n"
    )

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go() -> list:
        c = make(handler)
        try:
            return [e async for e in c.group_runs("tgrp_x")]
        finally:
            await c.aclose()

    assert run(go()) == [{"type": "task_run.state", "event_id": "1", "run": {"run_id": "trun_a"}}]


RUN = b'data: {"type": "task_run.state", "event_id": "1", "run": {"run_id": "trun_a"}}\n\n'
ERROR = b'event: error\ndata: {"type": "error", "error": {"ref_id": "r", "message": "listing failed"}}\n\n'


@pytest.mark.parametrize(
    "body,events,clean,errors",
    [
        (RUN + RUN, 2, True, []),  # ended normally: complete
        (RUN + b": ping\r\n\r\n", 1, True, []),
        (RUN + ERROR, 2, True, ["listing failed"]),  # ended normally, after an error event
        (RUN + RUN[:30], 1, False, []),  # ended inside an event: cut
        (RUN + b"data: {}\n", 1, False, []),  # an event without its blank line
    ],
)
def test_a_listing_says_whether_it_was_complete(body: bytes, events: int, clean: bool, errors: list[str]) -> None:
    """Only a body that ends at an event boundary and carried no `error` event is a complete listing."""

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go() -> tuple[int, StreamEnd]:
        c, end = make(handler), StreamEnd()
        try:
            return len([e async for e in c.group_runs("tgrp_x", end=end)]), end
        finally:
            await c.aclose()

    n, end = run(go())
    assert (n, end.clean, end.errors, end.complete) == (events, clean, errors, clean and not errors)


@pytest.mark.parametrize(
    "url,ok",
    [
        ("https://api.parallel.ai", True),
        ("http://127.0.0.1:8765", True),
        ("http://localhost:1", True),
        ("http://[::1]:1", True),
        ("http://api.parallel.ai", False),
        ("http://10.0.0.1", False),
        ("ftp://x", False),
    ],
)
def test_base_url_policy(url: str, ok: bool) -> None:
    if ok:
        assert check_base_url(url) == url
    else:
        with pytest.raises(ConfigError):
            check_base_url(url)
