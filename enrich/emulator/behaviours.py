"""Switchable server behaviours (`--behaviours cut,snapshots,...`): the legal-but-awkward things a
real Task API deployment does, so a client can be tested against them before meeting them live.

Every behaviour stays within the published OpenAPI spec: payloads keep their declared shapes
(extra keys are allowed everywhere by the spec), statuses are those the reference lists
(parallel-task-api.md section 8), and SSE variety is SSE as the WHATWG spec defines it. All draws
come from one seeded generator (`--seed`), so a run of the same requests is reproducible.

| name          | what the server does                                                                |
|---------------|-------------------------------------------------------------------------------------|
| `cut`         | group and run event streams end after 1-2 s or a few events, with no terminal event: |
|               | cleanly, mid-frame (a partial SSE frame, then close) or by TCP reset; some runs      |
|               | listings are aborted mid-stream (partial frame or reset)                             |
| `snapshots`   | a `task_group_status` event opens and closes every group events connection          |
| `eventual`    | runs reach listings/events up to ~1 s after add-runs returns; listings show finished |
|               | runs as `running` for up to 0.5 s; some completion events precede the add-runs reply |
| `shuffle`     | add-runs returns `run_ids` in an order different from the inputs                     |
| `framing`     | CRLF, comments, `id:`/`retry:`, `data:` without a space, JSON split over several      |
|               | `data:` lines, frames split across chunks, data-less events of unknown types         |
| `basis`       | fields without a basis entry, confidence "" or null, url-only citations, unknown keys |
| `connections` | `Connection: close`, idle keep-alive drops, early 408s on /result, 503 with          |
|               | Retry-After, 429 without Retry-After on creating POSTs (low rates: jobs still finish) |
| `endings`     | some runs end `failed` (with an error object) or `cancelled` (no error, 404 on result) |
| `errors`      | some runs listings end after an `error` event (part-way or after the last run), and   |
|               | some group events connections carry an `error` event, then end                       |
| `lost`        | some add-runs requests create all or only the first runs of the batch, then answer    |
|               | 503 or reset the connection (the reply is lost; the side effect is done)             |
| `nometa`      | `/result` and `GET run` often answer run objects without `metadata` (absent or null); |
|               | listings and events keep it (the reconciliation tool)                                |
| `expiry`      | a `last_event_id` older than a few seconds is answered 422 on both streams            |
| `action`      | some runs stop in `action_required` (not active) until `POST /_emulator/act`          |
| `echo`        | metadata values come back as another JSON type: 1 as 1.0, "1" as "1.0" or 1.0        |

With no behaviour on, the app never reaches this module's per-request code (the cost is one
truth test of an empty frozenset per request).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import struct
import uuid
from collections.abc import Iterable
from typing import Any

BEHAVIOURS = (
    "cut",
    "snapshots",
    "eventual",
    "shuffle",
    "framing",
    "basis",
    "connections",
    "endings",
    "errors",
    "lost",
    "nometa",
    "expiry",
    "action",
    "echo",
)

# cut
CUT_AFTER_S = (1.0, 2.0)  # a stream lives this long at most
CUT_AFTER_EVENTS = (2, 8)  # ... or this many events
CUT_MODES = ("clean", "midframe", "reset")
LISTING_ABORT_P = 0.3  # share of runs listings aborted part-way
# eventual
VISIBLE_DELAY_S = 1.0  # a run reaches listings/events up to this long after add-runs
STALE_S = 0.5  # listings may show a finished run as running this long
EARLY_SHARE = 0.1  # share of an add-runs batch that completes before the reply
EARLY_HOLD_S = 0.05  # how long the reply waits after those completions are announced
# connections
CONNECTION_CLOSE_P = 0.1
IDLE_DROP_P = 0.1
IDLE_DROP_S = (0.05, 0.5)  # the dropped connection's keep-alive timeout
RESULT_408_P = 0.15  # /result answers 408 early (run active, or completed < 1 s ago)
RESULT_LAG_S = 1.0
P503 = 0.02
RETRY_AFTER_503 = b"1"
P429 = 0.02  # creating POSTs only
# endings
FAILED_P = 0.05
CANCELLED_P = 0.03
# errors
LISTING_ERROR_P = 0.3  # share of runs listings that end after an `error` event
LISTING_ERROR_AT = (0.0, 1.0)  # ... after this share of their runs (uniform in the range)
STREAM_ERROR_P = 0.2  # share of group events connections that carry one, after 0-5 events
# lost
LOST_P = 0.1  # share of add-runs requests whose reply is lost after creating runs
LOST_PARTIAL_P = 0.5  # ... of which only the first runs of the batch were created
# nometa
NOMETA_P = 0.5  # share of /result and GET run replies whose run object has no metadata
# expiry
CURSOR_TTL_S = 3.0  # a cursor is valid this long after the event (or run) it names
# action
ACTION_P = 0.05  # share of runs that stop in action_required
ACTION_MESSAGE = "The run needs an action from the account owner before it can continue (emulated)."
RESUME_S = 0.05  # after `POST /_emulator/act`, a waiting run finishes this long later


def parse_behaviours(spec: str | Iterable[str] | None) -> frozenset[str]:
    """`parse_behaviours("cut, shuffle")` -> frozenset({'cut', 'shuffle'}); `all` = every behaviour."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or ())
    out: set[str] = set()
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            out.update(BEHAVIOURS)
        elif name in BEHAVIOURS:
            out.add(name)
        else:
            raise ValueError(
                f"unknown behaviour {name!r}: expected a comma-separated list of {', '.join(BEHAVIOURS)} (or all)"
            )
    return frozenset(out)


# ---- cut ---------------------------------------------------------------------------------
class CutPlan:
    """When and how one stream ends early: after `budget` events or at `deadline`, in `mode`."""

    __slots__ = ("budget", "deadline", "mode")

    def __init__(
        self,
        rng: random.Random,
        now: float,
        modes: tuple[str, ...] = CUT_MODES,
        budget: int | None = None,
        timed: bool = True,
    ):
        self.deadline = now + rng.uniform(*CUT_AFTER_S) if timed else float("inf")
        self.budget = rng.randint(*CUT_AFTER_EVENTS) if budget is None else budget
        self.mode = rng.choice(modes)


def reset_connection(send: Any) -> bool:
    """Abort the request's TCP connection with an RST (SO_LINGER 0), as a crashing peer does.

    Reaches uvicorn's transport through the bound `send` (its RequestResponseCycle); returns
    False when that is not possible.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None or cycle is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cycle.disconnected = True
    transport.abort()
    return True


def drop_when_idle(send: Any, seconds: float) -> None:
    """Shorten this connection's keep-alive timeout so uvicorn closes it after `seconds` idle.

    The close races a client that reuses the connection just then, exactly as a real load
    balancer's idle timeout does.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    protocol = transport.get_protocol() if transport is not None else None
    if protocol is not None and hasattr(protocol, "timeout_keep_alive"):
        protocol.timeout_keep_alive = seconds


# ---- framing -----------------------------------------------------------------------------
class Framer:
    """Encodes events as varied-but-valid SSE (WHATWG event-stream rules) for one stream.

    Each stream picks a line ending (LF or CRLF); each event may carry a comment line, an
    `id:` (the cursor, or a counter on run streams) or `retry:` field, an `event:` line with
    or without the space (or none: the type is then "message"), and its JSON on one `data:`
    line (with or without the space) or split over several `data:` lines at JSON whitespace
    (the reader joins them with newlines, which JSON ignores between tokens). Between events
    it may put a keep-alive comment or a data-less event of an unknown type, which an SSE
    reader does not dispatch (empty data) and a lenient one must skip.
    """

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.eol = rng.choice((b"\n", b"\r\n"))
        self.count = 0

    def event(self, obj: dict[str, Any]) -> bytes:
        rng, eol = self.rng, self.eol
        self.count += 1
        lines: list[bytes] = []
        x = rng.random()
        if x < 0.1:
            lines += [b": keep-alive", b""]
        elif x < 0.2:
            lines += [b"event: emulator.unknown_" + str(rng.randint(1, 3)).encode(), b""]
        if rng.random() < 0.2:
            lines.append(b": emulator comment " + str(self.count).encode())
        x = rng.random()
        if x < 0.6:
            lines.append(b"event: " + obj["type"].encode())
        elif x < 0.8:
            lines.append(b"event:" + obj["type"].encode())
        if rng.random() < 0.3:
            lines.append(b"id: " + str(obj.get("event_id") or self.count).encode())
        if rng.random() < 0.1:
            lines.append(b"retry: " + str(rng.choice((1000, 3000))).encode())
        x = rng.random()
        if x < 0.4:
            lines.append(b"data: " + _dumps(obj))
        elif x < 0.6:
            lines.append(b"data:" + _dumps(obj))
        else:
            parts = json.dumps(obj, indent=1, ensure_ascii=False).split("\n")
            k = rng.randint(2, min(5, len(parts)))
            step = -(-len(parts) // k)
            for i in range(0, len(parts), step):
                lines.append(b"data: " + "".join(parts[i : i + step]).encode())
        lines += [b"", b""]
        return eol.join(lines)

    def keepalive(self) -> bytes:
        return self.rng.choice((b": ping", b":", b": keep-alive")) + self.eol + self.eol

    def split(self, data: bytes) -> list[bytes]:
        """Cut a buffer into 1-3 chunks at arbitrary byte offsets (frames straddle writes)."""
        if len(data) < 4:
            return [data]
        cuts = sorted(self.rng.sample(range(1, len(data)), min(self.rng.randint(0, 2), len(data) - 1)))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# ---- basis -------------------------------------------------------------------------------
def vary_output(output: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A copy of a run output with basis variety: entries missing, confidence "" or null,
    url-only citations and unknown extra keys (all allowed by the spec's FieldBasis/Citation)."""
    basis = []
    for entry in output.get("basis") or []:
        if output["type"] == "json" and rng.random() < 0.15:
            continue  # "some fields may have no basis entry at all"
        entry = dict(entry)
        x = rng.random()
        if x < 0.1:
            entry["confidence"] = ""
        elif x < 0.2:
            entry["confidence"] = None
        elif x < 0.25:
            del entry["confidence"]
        cites = []
        for cite in entry.get("citations") or []:
            if rng.random() < 0.4:
                cite = {"url": cite["url"]}
            elif rng.random() < 0.3:
                cite = {**cite, "x_emulator_rank": rng.randint(1, 5)}
            cites.append(cite)
        entry["citations"] = cites
        if rng.random() < 0.2:
            entry["x_emulator_note"] = "an unknown key a client must ignore"
        basis.append(entry)
    return {**output, "basis": basis, "x_emulator_trace": {"variant": rng.randint(1, 9)}}


def vary_run(run_json: dict[str, Any]) -> dict[str, Any]:
    """Run objects gain unknown keys (the spec's TaskRun allows additional properties)."""
    run_json["x_emulator_region"] = "emu-1"
    run_json["usage"] = None
    return run_json


def stale_running(run_json: dict[str, Any]) -> dict[str, Any]:
    """How a lagging listing shows a run that has in fact finished: still running, no error."""
    return {**run_json, "status": "running", "is_active": True, "error": None}


# ---- errors ------------------------------------------------------------------------------
def error_event(message: str) -> dict[str, Any]:
    """An `error` event (the spec's ErrorEvent) as streams send them."""
    return {"type": "error", "error": {"ref_id": str(uuid.uuid4()), "message": message, "detail": None}}


# ---- echo --------------------------------------------------------------------------------
def echo_metadata(metadata: Any, variant: int) -> Any:
    """Metadata as a server that stores values as floats echoes it: integers and short integer strings come
    back as floats (1.0) or, for odd `variant`s, as float strings ("1.0")."""
    if not isinstance(metadata, dict):
        return metadata
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        integral = isinstance(v, int) and not isinstance(v, bool)
        if integral or (isinstance(v, str) and re.fullmatch(r"-?[0-9]{1,9}", v)):
            v = f"{int(v)}.0" if variant % 2 else float(v)
        out[k] = v
    return out
