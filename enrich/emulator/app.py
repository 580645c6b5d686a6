"""The emulator's ASGI app: routing, auth, rate limit, faults, long-polls (SSE streams: streams.py).

A plain ASGI callable (no framework): the routes are a dozen regexes, and owning the
`send` channel lets the fault injector truncate a body or drop a connection exactly the way
a failing network does.

Every response carries `x-enrich-emulator: <enrich version>` (so a client reaching the
emulator through any base URL can tell it is emulated) and `x-enrich-emulator-instance:
<uuid>`, fixed for the life of the server (a new value means the emulator restarted and its
state is gone). Emulator-only extensions live under `/_emulator/` (ledger, stats, reset, faults).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from enrich import __version__
from enrich.emulator import behaviours as bh
from enrich.emulator.core import Emulator, parse_faults
from enrich.emulator.streams import Streams
from enrich.emulator.validate import Invalid

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

EMULATOR_HEADER = b"x-enrich-emulator"
INSTANCE_HEADER = b"x-enrich-emulator-instance"

_ID = r"([A-Za-z0-9_\-]+)"
ROUTES: list[tuple[str, re.Pattern[str], str, bool]] = [
    # (method, path regex after /v1 or /v1beta, route name, creates paid runs)
    ("POST", re.compile(r"/tasks/runs"), "create_run", True),
    ("GET", re.compile(rf"/tasks/runs/{_ID}"), "get_run", False),
    ("GET", re.compile(rf"/tasks/runs/{_ID}/input"), "get_input", False),
    ("GET", re.compile(rf"/tasks/runs/{_ID}/result"), "get_result", False),
    ("GET", re.compile(rf"/tasks/runs/{_ID}/events"), "run_events", False),
    ("POST", re.compile(r"/tasks/groups"), "create_group", False),
    ("GET", re.compile(rf"/tasks/groups/{_ID}"), "get_group", False),
    ("POST", re.compile(rf"/tasks/groups/{_ID}/runs"), "add_runs", True),
    ("GET", re.compile(rf"/tasks/groups/{_ID}/runs"), "group_runs", False),
    ("GET", re.compile(rf"/tasks/groups/{_ID}/events"), "group_events", False),
    ("GET", re.compile(rf"/tasks/groups/{_ID}/runs/{_ID}"), "group_run", False),
]
SSE_ROUTES = {"run_events", "group_runs", "group_events"}
GROUP_ROUTES = {"create_group", "get_group", "add_runs", "group_runs", "group_events"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _abort(send: Send) -> bool:
    """Close the TCP connection without any response (the lost-response fault).

    ASGI has no message for this, so reach the server's transport through the bound `send`
    (uvicorn's RequestResponseCycle). Returns False when that is not possible.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return False
    cycle.disconnected = True  # type: ignore[union-attr]
    transport.abort()
    return True


class Responder:
    """One request's reply channel, remembering the status for the stats table.

    `headers` go on whichever response is sent (the emulator's identity, `Connection: close`).
    """

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]]):
        self.send, self.status, self.headers = send, 0, headers

    async def json(
        self, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None, truncate: bool = False
    ) -> None:
        body = _dumps(obj)
        self.status = status
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *self.headers]
        await self.send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
        if truncate:  # 2xx headers, then half the body, then the connection closes
            await self.send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            return
        await self.send({"type": "http.response.body", "body": body})

    async def error(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        validation_shape: bool = False,
        loc: list[Any] | None = None,
    ) -> None:
        if validation_shape:  # group endpoints declare FastAPI's 422 shape in the spec
            obj: Any = {"detail": [{"loc": loc or ["body"], "msg": message, "type": "value_error"}]}
        else:
            obj = {"type": "error", "error": {"ref_id": str(uuid.uuid4()), "message": message, "detail": None}}
        await self.json(status, obj, headers)

    async def start_sse(self) -> None:
        self.status = 200
        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    *self.headers,
                ],
            }
        )

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class App(Streams):
    """ASGI app over one `Emulator`. Also runs the ticker that advances simulated time."""

    def __init__(self, emulator: Emulator):
        self.emu = emulator
        self.ticker: asyncio.Task[None] | None = None
        self.default_slow_s = 35.0
        self.instance_id = str(uuid.uuid4())
        self.identity = [(EMULATOR_HEADER, __version__.encode()), (INSTANCE_HEADER, self.instance_id.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.ticker is None:
            self.ticker = asyncio.get_running_loop().create_task(self._tick())
        out = Responder(send, list(self.identity))
        path: str = scope["path"]
        try:
            if path.startswith("/_emulator/"):
                await self._control(scope, receive, out, path)
                return
            await self._api(scope, receive, out, send, path)
        except Invalid as exc:
            if out.status == 0:
                await out.error(exc.status, exc.message)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.ticker = asyncio.get_running_loop().create_task(self._tick())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.ticker:
                    self.ticker.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _tick(self) -> None:
        """Advance simulated time exactly when the next run starts or finishes."""
        emu = self.emu
        while True:
            emu.advance()
            due = emu.next_due()
            delay = 1.0 if due is None else max(0.0, due - time.monotonic())
            emu.wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(emu.wake.wait(), timeout=min(delay, 1.0))
            else:
                await asyncio.sleep(0)

    # ---- emulator-only control routes --------------------------------------------------
    async def _control(self, scope: Scope, receive: Receive, out: Responder, path: str) -> None:
        method = scope["method"]
        if method == "GET" and path == "/_emulator/ledger":
            await out.json(200, self.emu.ledger_json())
        elif method == "GET" and path == "/_emulator/stats":
            self.emu.advance()
            await out.json(200, self.emu.stats_json())
        elif method == "GET" and path == "/_emulator/requests":
            await out.json(200, [list(r) for r in self.emu.request_log])
        elif method == "POST" and path == "/_emulator/act":  # the account owner acts on runs waiting for it
            await out.json(200, {"resumed": self.emu.act()})
        elif method == "POST" and path == "/_emulator/reset":
            self.emu.reset()
            await out.json(200, {"reset": True})
        elif method == "POST" and path == "/_emulator/faults":
            body = await self._body(receive)
            try:
                self.emu.faults = parse_faults(str(body.get("faults", "")) if isinstance(body, dict) else "")
            except ValueError as exc:
                await out.error(422, str(exc))
                return
            await out.json(200, {"faults": self.emu.faults})
        else:
            await out.error(404, f"No such emulator route: {method} {path}")

    # ---- the API -----------------------------------------------------------------------
    async def _api(self, scope: Scope, receive: Receive, out: Responder, send: Send, path: str) -> None:
        emu = self.emu
        method = scope["method"]
        match = None
        route = ""
        creating = False
        rest = path[len("/v1beta") :] if path.startswith("/v1beta/") else path[3:] if path.startswith("/v1/") else None
        if rest is not None:
            for r_method, pattern, name, is_create in ROUTES:
                m = pattern.fullmatch(rest)
                if m and r_method == method:
                    match, route, creating = m, name, is_create
                    break
        if match is None:
            await out.error(404, f"Not found: {method} {path}")
            return
        t0 = time.time()
        try:
            await self._dispatch(scope, receive, out, send, route, match.groups(), creating)
        finally:
            emu.stats.requests[f"{method} {route} {out.status or 'dropped'}"] += 1
            emu.request_log.append((round(t0, 4), method, route, out.status))

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        out: Responder,
        send: Send,
        route: str,
        params: tuple[str, ...],
        creating: bool,
    ) -> None:
        emu = self.emu
        headers = dict(scope["headers"])
        key = headers.get(b"x-api-key", b"").decode("latin-1")
        if not key or (emu.config.api_key is not None and key != emu.config.api_key):
            await out.error(401, "Missing or invalid API key (x-api-key header).")
            return
        now = time.monotonic()
        emu.advance(now)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        body = await self._body(receive) if scope["method"] == "POST" else None
        if creating:
            wait = emu.check_rate(key, now)
            if wait is not None:
                await out.error(429, "Too many requests: creating POSTs are limited per minute.")
                return
        if emu.behaviours and "connections" in emu.behaviours and await self._connections(out, send, route, creating):
            return
        fault = None if route in SSE_ROUTES else emu.draw_fault()
        if fault:
            emu.stats.faults[f"{route} {fault}"] += 1
        retry_hdr = [(b"retry-after", str(emu.faults["retry_after"]).encode())] if "retry_after" in emu.faults else []
        if fault == "429":
            await out.error(429, "Too many requests (injected fault).", retry_hdr)
            return
        if fault == "503":
            await out.error(503, "Service unavailable (injected fault).")
            return
        if fault == "422" and route == "add_runs":  # the batch is refused; nothing is created
            await out.error(422, "Input rejected (injected fault).", validation_shape=True, loc=["body", "inputs"])
            return
        if fault == "500" and (not creating or emu.fault_rng.random() < 0.5):
            await out.error(500, "Internal server error (injected fault).")
            return
        handler = getattr(self, f"_{route}")
        try:
            status, obj = await handler(params, query, body, receive, out)
        except Invalid as exc:
            await out.error(
                exc.status, exc.message, validation_shape=exc.status == 422 and route in GROUP_ROUTES, loc=exc.loc
            )
            return
        if status == 0:  # streamed already
            return
        if fault == "500":  # the work was done, the reply says it was not
            await out.error(500, "Internal server error (injected fault).")
        elif fault == "drop":
            if not _abort(send):
                raise RuntimeError("cannot drop the connection on this server")
        elif fault == "slow":
            await asyncio.sleep(emu.faults.get("slow_s", self.default_slow_s))
            await out.json(status, obj)
        elif fault == "truncate":
            await out.json(status, obj, truncate=True)
        else:
            await out.json(status, obj)

    async def _connections(self, out: Responder, send: Send, route: str, creating: bool) -> bool:
        """The `connections` behaviour for one request; True when it has answered it (503/429)."""
        emu, rng = self.emu, self.emu.brng
        if rng.random() < bh.CONNECTION_CLOSE_P:
            out.headers.append((b"connection", b"close"))
        elif rng.random() < bh.IDLE_DROP_P:
            bh.drop_when_idle(send, rng.uniform(*bh.IDLE_DROP_S))
        x = rng.random()
        if x < bh.P503:
            emu.stats.faults[f"{route} behaviour-503"] += 1
            await out.error(503, "Service temporarily unavailable.", [(b"retry-after", bh.RETRY_AFTER_503)])
            return True
        if creating and x < bh.P503 + bh.P429:
            emu.stats.faults[f"{route} behaviour-429"] += 1
            await out.error(429, "Too many requests: quota temporarily exceeded.")
            return True
        return False

    @staticmethod
    async def _body(receive: Receive) -> Any:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise Invalid(422, "request body is not valid JSON") from None

    # ---- handlers: return (status, json) or (0, None) after streaming ------------------
    async def _create_run(self, params, query, body, receive, out):
        run = self.emu.create_run(body, time.monotonic())
        return 202, self.emu.run_json(run)

    async def _get_run(self, params, query, body, receive, out):
        return 200, self.emu.run_json(self.emu.get_run(params[0]), bare="nometa" in self.emu.behaviours)

    async def _group_run(self, params, query, body, receive, out):
        group = self.emu.get_group(params[0])
        run = self.emu.get_run(params[1])
        if run.group is not group:
            raise Invalid(404, "Run id not found in this task group")
        return 200, self.emu.run_json(run, bare="nometa" in self.emu.behaviours)

    async def _get_input(self, params, query, body, receive, out):
        run = self.emu.get_run(params[0])
        return 200, {**run.body, "task_spec": run.spec}

    async def _get_result(self, params, query, body, receive, out):
        emu = self.emu
        run = emu.get_run(params[0])
        try:
            timeout = float((query.get("timeout") or ["600"])[-1])
        except ValueError:
            raise Invalid(422, "timeout must be an integer number of seconds") from None
        if emu.behaviours and "connections" in emu.behaviours and emu.brng.random() < bh.RESULT_408_P:
            # the long-poll ends early: the run is still active, or finished so recently that the
            # result store has not caught up
            if not run.done:
                timeout = min(timeout, emu.brng.uniform(0, 0.5))
            elif time.monotonic() - run.done_at < bh.RESULT_LAG_S:
                raise Invalid(408, "Request timed out; run still active.")
        if not run.done and timeout > 0:
            fut = emu.wait_for(run)
            gone = asyncio.ensure_future(self._disconnected(receive))
            await asyncio.wait([fut, gone], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            emu.advance()
        if not run.done:
            raise Invalid(408, "Request timed out; run still active.")
        if run.status == "failed":
            raise Invalid(404, "Run failed or run id not found.")
        if run.status == "cancelled":
            raise Invalid(404, "Run was cancelled; it has no result.")
        return 200, {"run": emu.run_json(run, bare="nometa" in emu.behaviours), "output": emu.output_json(run)}

    async def _create_group(self, params, query, body, receive, out):
        return 200, self.emu.group_json(self.emu.create_group(body, time.monotonic()))

    async def _get_group(self, params, query, body, receive, out):
        return 200, self.emu.group_json(self.emu.get_group(params[0]))

    async def _add_runs(self, params, query, body, receive, out):
        emu = self.emu
        group = emu.get_group(params[0])
        now = time.monotonic()
        lost = "lost" in emu.behaviours and emu.brng.random() < bh.LOST_P
        n = len(body["inputs"]) if isinstance(body, dict) and isinstance(body.get("inputs"), list) else 0
        create = emu.brng.randint(1, n - 1) if lost and n > 1 and emu.brng.random() < bh.LOST_PARTIAL_P else None
        runs, run_cursor, event_cursor = emu.add_runs(group, body, now, create)
        run_ids = [r.run_id for r in runs]
        if lost:  # the runs exist (all, or the first `create`); the reply that says so is lost
            emu.stats.faults[f"add_runs behaviour-lost{'-partial' if create else ''}"] += 1
            if emu.brng.random() < 0.5 and bh.reset_connection(out.send):
                return 0, None
            raise Invalid(503, "Service temporarily unavailable.")
        if emu.behaviours:
            if "shuffle" in emu.behaviours and len(run_ids) > 1:
                order = run_ids[:]
                while order == run_ids:
                    emu.brng.shuffle(order)
                run_ids = order
            if emu.eventual and any(r.visible_at <= now for r in runs):
                emu.advance()  # announce the runs that finished at once before replying
                await asyncio.sleep(bh.EARLY_HOLD_S)
        return 200, {
            "run_ids": run_ids,
            "status": emu.group_status(group),
            "run_cursor": run_cursor,
            "event_cursor": event_cursor,
        }

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
