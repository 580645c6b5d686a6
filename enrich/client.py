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
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import SSEError, aconnect_sse

from enrich import __version__
from enrich.errors import ApiError, ConfigError, OutcomeUnknown, TransientApiError, redact
from enrich.retry import classify_failure, classify_status, parse_retry_after

STREAM_READ_TIMEOUT = 75.0  # > the servers' keep-alive interval on SSE streams
FIELD_BASIS_BETA = "field-basis-2025-11-25"  # per-element basis entries for array fields (sent on add-runs)
EMULATOR_HEADER = "x-enrich-emulator"  # every emulator response carries it: outputs are marked emulated


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

    async def stream(self, path: str, what: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield each SSE event's JSON object (the dispatch key is its `type`)."""
        self.requests += 1
        timeout = httpx.Timeout(connect=5.0, read=STREAM_READ_TIMEOUT, write=10.0, pool=10.0)
        try:
            async with aconnect_sse(self._http, "GET", path, params=params, timeout=timeout) as source:
                resp = source.response
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._error(resp, False, what)
                async for sse in source.aiter_sse():
                    if not sse.data:
                        continue
                    try:
                        event = json.loads(sse.data)
                    except ValueError:
                        raise TransientApiError(f"{what}: an event is not JSON") from None
                    if isinstance(event, dict):
                        yield event
        except (httpx.HTTPError, OSError, SSEError) as exc:
            raise self._exc(exc, False, what) from None

    def group_runs(
        self,
        taskgroup_id: str,
        last_event_id: str | None = None,
        status: str | None = None,
        include_output: bool = False,
        include_input: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        params: dict[str, Any] = {
            "include_output": str(include_output).lower(),
            "include_input": str(include_input).lower(),
        }
        if last_event_id:
            params["last_event_id"] = last_event_id
        if status:
            params["status"] = status
        return self.stream(f"/v1/tasks/groups/{taskgroup_id}/runs", "list group runs", params)

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
