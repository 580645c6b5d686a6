"""The Task API client: the only module that imports httpx.

Every failure leaves here as one class of the error tree (errors.py), classified by
retry.classify_status / classify_exception: the callers never see httpx exceptions and never
guess. No retries happen here (one retry layer, in the stages, driven by the journal), no
redirects are followed (httpx would resend `x-api-key` to another origin), and the key is
never put in a URL, a log line or an exception message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from enrich import __version__
from enrich.errors import ApiError, ConfigError, OutcomeUnknown, TransientApiError, redact
from enrich.retry import classify_failure, classify_status, parse_retry_after

STREAM_READ_TIMEOUT = 75.0  # > the servers' keep-alive interval on SSE streams
FIELD_BASIS_BETA = "field-basis-2025-11-25"  # per-element basis entries for array fields (sent on add-runs)
EMULATOR_HEADER = "x-enrich-emulator"  # every emulator response carries it: outputs are marked emulated
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass
class StreamEnd:
    """How one event stream ended, filled in as it is read: `clean` once its body ended at an event
    boundary (not inside an event, not by a transport error), `errors` the messages of its `error` events.

    Only a `complete` runs listing shows every run of the group: one cut, or carrying an `error` event
    (the spec allows them in listings), says nothing about the runs it did not show."""

    clean: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.clean and not self.errors


class EventStream:
    r"""WHATWG event-stream parsing of a body fed as text arrives: `feed` returns the data of each event
    dispatched (events without data are not; `event:`, `id:` and `retry:` fields are ignored, since the
    dispatch key is the JSON `type`). `inside` says whether the text so far stopped inside an event: at
    the end of a body, that means the stream was cut rather than ended.

    >>> s = EventStream()
    >>> s.feed("data: 1\r\n\r\n: ping\n\ndata: {\n"), s.inside
    (['1'], True)
    >>> s.feed("data: 2}\n\n"), s.inside
    (['{\n2}'], False)
    """

    def __init__(self) -> None:
        self.tail = ""  # text after the last line ending
        self.cr = False  # the text so far ended with \r: a \n opening the next piece belongs to it
        self.data: list[str] = []
        self.open = False  # a line since the last blank line

    def feed(self, text: str) -> list[str]:
        if self.cr and text.startswith("\n"):
            text = text[1:]
        if text:
            self.cr = text.endswith("\r")
        lines = _LINE_END.split(self.tail + text)
        self.tail = lines.pop()
        out = []
        for line in lines:
            if not line:
                if self.data:
                    out.append("\n".join(self.data))
                self.data, self.open = [], False
                continue
            self.open = True
            name, _, value = line.partition(":")
            if name == "data":
                self.data.append(value[1:] if value.startswith(" ") else value)
        return out

    @property
    def inside(self) -> bool:
        return bool(self.tail) or self.open


def check_base_url(url: str) -> str:
    """Allow https:// anywhere and http:// only on loopback (the emulator); return it without a trailing /."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url.rstrip("/")
    if parts.scheme == "http":
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if loopback:
            return url.rstrip("/")
    raise ConfigError(f"base URL {url!r} refused: use https://, or http:// only on loopback (127.0.0.1, localhost)")


class TaskClient:
    """Async client for the task-group endpoints enrich uses.

    `transport` lets tests mount `httpx.MockTransport`; `on_response` is a hook called with
    each response before its body is read (used by the `after_send_before_response` failpoint).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: Callable[[httpx.Response], Any] | None = None,
    ):
        self.base_url = check_base_url(base_url)
        self._key = api_key
        hooks: dict[str, list[Any]] = {"response": [self._note_server, *([on_response] if on_response else [])]}
        self.emulator_seen = False
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            follow_redirects=False,
            timeout=httpx.Timeout(connect=5.0, read=timeout_s, write=10.0, pool=10.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            headers={"x-api-key": api_key, "user-agent": f"enrich/{__version__}"},
            event_hooks=hooks,
        )
        self.requests = 0

    async def _note_server(self, response: httpx.Response) -> None:
        if EMULATOR_HEADER in response.headers:
            self.emulator_seen = True

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- plumbing ------------------------------------------------------------------------
    def _error(self, resp: httpx.Response, creating: bool, what: str) -> ApiError:
        message = _server_message(resp)
        cls = classify_status(resp.status_code, creating)
        text = redact(f"{what}: HTTP {resp.status_code}: {message}", self._key)
        return cls(text, status=resp.status_code, retry_after=parse_retry_after(resp.headers))

    def _exc(self, exc: Exception, creating: bool, what: str) -> ApiError:
        cls = classify_failure(_failure_kind(exc), creating)
        detail = str(exc) or type(exc).__name__
        return cls(redact(f"{what}: {type(exc).__name__}: {detail}"[:500], self._key))

    async def _json(
        self, method: str, path: str, what: str, creating: bool = False, ok: tuple[int, ...] = (200, 202), **kw: Any
    ) -> tuple[int, Any]:
        self.requests += 1
        try:
            resp = await self._http.request(method, path, **kw)
        except (httpx.HTTPError, OSError) as exc:
            raise self._exc(exc, creating, what) from None
        if resp.status_code not in ok:
            raise self._error(resp, creating, what)
        try:
            return resp.status_code, resp.json()
        except ValueError:
            cls = OutcomeUnknown if creating else TransientApiError
            raise cls(
                f"{what}: HTTP {resp.status_code} with a body that is not JSON", status=resp.status_code
            ) from None

    # ---- endpoints -----------------------------------------------------------------------
    async def create_group(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        _, body = await self._json(
            "POST", "/v1/tasks/groups", "create task group", json={"metadata": metadata} if metadata else {}
        )
        if not isinstance(body, dict) or not isinstance(body.get("taskgroup_id"), str):
            raise TransientApiError("create task group: reply without taskgroup_id")
        return body

    async def get_group(self, taskgroup_id: str) -> dict[str, Any]:
        _, body = await self._json("GET", f"/v1/tasks/groups/{taskgroup_id}", "get task group")
        return body

    async def add_runs(
        self, taskgroup_id: str, inputs: list[dict[str, Any]], default_task_spec: dict[str, Any] | None
    ) -> dict[str, Any]:
        """POST up to 1,000 runs. Any doubt about whether they were created raises OutcomeUnknown."""
        payload: dict[str, Any] = {"inputs": inputs}
        if default_task_spec is not None:
            payload["default_task_spec"] = default_task_spec
        headers = {"parallel-beta": FIELD_BASIS_BETA} if has_array_fields(default_task_spec) else None
        _, body = await self._json(
            "POST", f"/v1/tasks/groups/{taskgroup_id}/runs", "add runs", creating=True, json=payload, headers=headers
        )
        run_ids = body.get("run_ids") if isinstance(body, dict) else None
        if not isinstance(run_ids, list) or len(run_ids) != len(inputs) or not all(isinstance(r, str) for r in run_ids):
            raise OutcomeUnknown(
                f"add runs: reply lists {len(run_ids) if isinstance(run_ids, list) else 'no'} "
                f"run ids for {len(inputs)} inputs"
            )
        return body

    async def get_run(self, run_id: str) -> dict[str, Any]:
        _, body = await self._json("GET", f"/v1/tasks/runs/{run_id}", "get run")
        return body

    async def result(self, run_id: str, timeout_s: int = 0) -> dict[str, Any] | None:
        """The run's {run, output}; None while it is still active (408)."""
        try:
            _, body = await self._json(
                "GET",
                f"/v1/tasks/runs/{run_id}/result",
                "get result",
                params={"timeout": timeout_s},
                ok=(200,),
                timeout=httpx.Timeout(connect=5.0, read=timeout_s + 30.0, write=10.0, pool=10.0),
            )
        except ApiError as exc:
            if exc.status == 408:
                return None
            raise
        return body

    async def stream(
        self, path: str, what: str, params: dict[str, Any], end: StreamEnd | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield each SSE event's JSON object (the dispatch key is its `type`); `end` learns how it ended."""
        self.requests += 1
        timeout = httpx.Timeout(connect=5.0, read=STREAM_READ_TIMEOUT, write=10.0, pool=10.0)
        headers = {"accept": "text/event-stream", "cache-control": "no-store"}
        parser = EventStream()
        try:
            async with self._http.stream("GET", path, params=params, headers=headers, timeout=timeout) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._error(resp, False, what)
                if "text/event-stream" not in resp.headers.get("content-type", ""):
                    raise TransientApiError(f"{what}: HTTP 200 that is not an event stream")
                async for text in resp.aiter_text():
                    for data in parser.feed(text):
                        try:
                            event = json.loads(data)
                        except ValueError:
                            raise TransientApiError(f"{what}: an event is not JSON") from None
                        if not isinstance(event, dict):
                            continue
                        if end is not None and event.get("type") == "error":
                            err = event.get("error")
                            message = err.get("message") if isinstance(err, dict) else None
                            end.errors.append(str(message or "an error event without a message"))
                        yield event
        except (httpx.HTTPError, OSError) as exc:
            raise self._exc(exc, False, what) from None
        if end is not None:
            end.clean = not parser.inside

    def group_runs(
        self,
        taskgroup_id: str,
        last_event_id: str | None = None,
        status: str | None = None,
        include_output: bool = False,
        include_input: bool = False,
        end: StreamEnd | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The group's runs (from `last_event_id`) as `task_run.state` events; `end` learns whether the
        listing was complete."""
        params: dict[str, Any] = {
            "include_output": str(include_output).lower(),
            "include_input": str(include_input).lower(),
        }
        if last_event_id:
            params["last_event_id"] = last_event_id
        if status:
            params["status"] = status
        return self.stream(f"/v1/tasks/groups/{taskgroup_id}/runs", "list group runs", params, end)

    def group_events(
        self, taskgroup_id: str, last_event_id: str | None = None, timeout_s: float = 60
    ) -> AsyncIterator[dict[str, Any]]:
        params: dict[str, Any] = {"timeout": timeout_s}
        if last_event_id:
            params["last_event_id"] = last_event_id
        return self.stream(f"/v1/tasks/groups/{taskgroup_id}/events", "group events", params)


def has_array_fields(task_spec: dict[str, Any] | None) -> bool:
    """Does the spec's output have a top-level array field? Then element-level basis is asked for."""
    try:
        props = task_spec["output_schema"]["json_schema"]["properties"]  # type: ignore[index]
    except (KeyError, TypeError):
        return False
    return any(
        "array" in (p["type"] if isinstance(p.get("type"), list) else [p.get("type")])
        for p in props.values()
        if isinstance(p, dict)
    )


def _failure_kind(exc: Exception) -> str:
    """Name the transport failure for retry.classify_failure (which must not import httpx)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect_timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_timeout"
    if isinstance(exc, httpx.WriteError | httpx.WriteTimeout):
        return "write"
    if isinstance(exc, httpx.ReadTimeout):
        return "read_timeout"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    return "read"


def _server_message(resp: httpx.Response) -> str:
    """The server's error message from either error shape, or a short excerpt of the body."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip().replace("\n", " ")
        return (text[:120] + "...") if len(text) > 120 else (text or "(empty body)")
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        detail = body.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            return str(detail[0].get("msg", detail[0]))
    return str(body)[:200]
