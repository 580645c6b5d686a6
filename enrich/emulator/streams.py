"""The emulator's SSE endpoints: runs listings, group events and run events.

Plain framing follows the rules the official SDK's decoder needs (parallel-task-api.md
section 11): `type` inside every `data:` JSON, no `id:` lines, cursors in `event_id`,
keep-alives as `: ping` comment lines. Every stream writes through an `SseWriter`, which is
also where the `framing` behaviour (varied SSE), the `cut` behaviour (streams ended early:
cleanly, mid-frame or by TCP reset) and the `errors` behaviour (an `error` event, then a normal
end) are applied, so the handlers read the same either way. `expiry` answers old cursors 422.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from enrich.emulator import behaviours as bh
from enrich.emulator.core import Emulator, Group, Run
from enrich.emulator.validate import Invalid

Receive = Callable[[], Awaitable[dict[str, Any]]]

KEEPALIVE_S = 10.0
SSE_CHUNK = 64  # events per write when listing runs


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _flag(query: dict[str, list[str]], name: str, default: bool = False) -> bool:
    values = query.get(name)
    return default if not values else values[-1].lower() in ("true", "1", "yes")


def _cursor(query: dict[str, list[str]]) -> int:
    raw = (query.get("last_event_id") or [""])[-1]
    if not raw:
        return 0
    try:
        return int(raw) + 1
    except ValueError:
        raise Invalid(422, f"invalid last_event_id {raw!r}") from None


class SseWriter:
    """One SSE response body: buffers encoded events and writes them in chunks.

    With a `Framer` each event is framed with SSE variety and each write is split at arbitrary
    byte offsets. With a `CutPlan`, `add` refuses the event once the plan's budget is spent
    (that event becomes the frame a mid-frame cut interrupts), and `close` ends the stream the
    plan's way instead of normally. With `error_after`, `add` sends an `error` event instead of
    that many-th event and refuses the rest; `close` then ends the stream normally.
    """

    def __init__(
        self,
        out: Any,
        rng: random.Random,
        framer: bh.Framer | None = None,
        cut: bh.CutPlan | None = None,
        error_after: int | None = None,
    ):
        self.out, self.rng, self.framer, self.cut = out, rng, framer, cut
        self.buf: list[bytes] = []
        self.sent = 0
        self.cutting = False
        self.partial = b""
        self.error_after = error_after
        self.errored = False

    @property
    def stopped(self) -> bool:
        """Nothing more may be added: the stream is being cut, or it carried its error event."""
        return self.cutting or self.errored

    def encode(self, obj: dict[str, Any]) -> bytes:
        return self.framer.event(obj) if self.framer else _sse(obj)

    def add(self, obj: dict[str, Any]) -> bool:
        """Buffer one event; False when the cut plan ends the stream here (add nothing more)."""
        if self.stopped:
            return False
        if self.cut is not None and self.sent >= self.cut.budget:
            self.cut_here(obj)
            return False
        if self.error_after is not None and self.sent >= self.error_after:
            self._error()
            return False
        self.buf.append(self.encode(obj))
        self.sent += 1
        return True

    def _error(self) -> None:
        self.buf.append(self.encode(bh.error_event("Internal error while streaming; the stream ends here.")))
        self.errored = True

    def cut_here(self, obj: dict[str, Any]) -> None:
        """Start cutting: `obj` is the event a mid-frame cut sends only part of."""
        self.cutting = True
        self.partial = self.encode(obj)

    @property
    def full(self) -> bool:
        return len(self.buf) >= SSE_CHUNK

    def time_left(self, now: float) -> float:
        return float("inf") if self.cut is None else self.cut.deadline - now

    async def flush(self) -> None:
        if not self.buf:
            return
        data = b"".join(self.buf)
        self.buf = []
        if self.framer is None:
            await self.out.chunk(data)
            return
        for piece in self.framer.split(data):
            await self.out.chunk(piece)

    async def ping(self) -> None:
        await self.out.chunk(self.framer.keepalive() if self.framer else b": ping\n\n")

    async def close(self, last: dict[str, Any] | None = None) -> None:
        """End the stream, after `last` (a closing snapshot) unless a mid-frame cut or reset ends it."""
        mode = self.cut.mode if self.cutting and self.cut is not None else None
        if self.error_after is not None and not self.stopped:  # due after the last event: it ends the stream
            self._error()
        if last is not None and mode in (None, "clean") and not self.errored:
            self.buf.append(self.encode(last))
        await self.flush()
        if mode == "midframe":  # an incomplete frame, then a clean end of the body
            await self.out.chunk(self.partial[: self.rng.randint(1, max(1, len(self.partial) - 3))])
        if mode == "reset" and bh.reset_connection(self.out.send):
            return
        await self.out.end()


class Streams:
    """Mixin of the App: the three SSE handlers. Needs `self.emu` and `self._disconnected`."""

    emu: Emulator
    _disconnected: Callable[[Receive], Awaitable[None]]

    def _writer(self, out: Any, *, listing: int | None = None, group: bool = False) -> SseWriter:
        """The writer for one stream: framing, cut and errors per the behaviours switched on.

        `listing` = number of runs a runs listing will send (cut there = abort part-way, sometimes);
        `group` = a group events stream (errors: sometimes an `error` event after a few events).
        """
        emu = self.emu
        if not emu.behaviours:
            return SseWriter(out, emu.brng)
        rng = emu.brng
        error_after = None
        if "errors" in emu.behaviours:
            if listing is not None and rng.random() < bh.LISTING_ERROR_P:
                lo, hi = bh.LISTING_ERROR_AT  # part-way, or after the last run
                error_after = round(rng.uniform(lo, hi) * listing)
            elif group and rng.random() < bh.STREAM_ERROR_P:
                error_after = rng.randint(0, 5)
        framer = bh.Framer(rng) if "framing" in emu.behaviours else None
        cut = None
        if "cut" in emu.behaviours:
            if listing is None:
                cut = bh.CutPlan(rng, time.monotonic())
            elif listing > 0 and rng.random() < bh.LISTING_ABORT_P:
                cut = bh.CutPlan(rng, 0.0, modes=("midframe", "reset"), budget=rng.randrange(listing), timed=False)
        return SseWriter(out, rng, framer, cut, error_after)

    def _run_event(self, run: Run, event_id: str | None, include_input: bool, include_output: bool) -> dict[str, Any]:
        return {
            "type": "task_run.state",
            "event_id": event_id,
            "run": self.emu.run_json(run),
            "input": {**run.body, "task_spec": run.spec} if include_input else None,
            "output": self.emu.output_json(run) if include_output and run.status == "completed" else None,
        }

    def _status_event(self, group: Group, event_id: int) -> dict[str, Any]:
        return {"type": "task_group_status", "event_id": str(event_id), "status": self.emu.group_status(group)}

    async def _group_runs(self, params, query, body, receive, out):
        """List the group's runs from the cursor on, at once, without waiting (the bulk result API)."""
        emu = self.emu
        group = emu.get_group(params[0])
        start = _cursor(query)
        wanted = (query.get("status") or [None])[-1]
        inc_in, inc_out = _flag(query, "include_input"), _flag(query, "include_output")
        now = time.monotonic()
        emu.check_cursor(group, start, True, now)
        runs = emu.visible_runs(group, start, now)
        writer = self._writer(out, listing=len(runs))
        stale = emu.eventual
        await out.start_sse()
        gone = asyncio.ensure_future(self._disconnected(receive))
        try:
            for run in runs:
                if stale and run.done and now < run.done_at + run.stale_s:
                    event = {
                        "type": "task_run.state",
                        "event_id": str(run.seq),
                        "output": None,
                        "run": bh.stale_running(emu.run_json(run)),
                        "input": {**run.body, "task_spec": run.spec} if inc_in else None,
                    }
                    if wanted and wanted != "running":
                        continue
                else:
                    if wanted and run.status != wanted:
                        continue
                    event = self._run_event(run, str(run.seq), inc_in, inc_out)
                if not writer.add(event):
                    break
                if writer.full:
                    await writer.flush()
                    await asyncio.sleep(0)  # let the disconnect watcher run: clients close listings early
                    if gone.done():
                        return 0, None
            await writer.close()
        finally:
            gone.cancel()
        return 0, None

    async def _group_events(self, params, query, body, receive, out):
        """Replay the group's event log from the cursor, then follow it while runs are active."""
        emu = self.emu
        group = emu.get_group(params[0])
        pos = _cursor(query)
        try:
            timeout = float((query.get("timeout") or ["3600"])[-1])
        except ValueError:
            raise Invalid(422, "timeout must be a number of seconds") from None
        deadline = time.monotonic() + timeout
        emu.check_cursor(group, pos, False, time.monotonic())
        writer = self._writer(out, group=True)
        snapshots = "snapshots" in emu.behaviours
        await out.start_sse()
        gone = asyncio.ensure_future(self._disconnected(receive))
        try:
            if snapshots:
                writer.add(self._status_event(group, pos - 1))
            while not gone.done() and not writer.stopped:
                emu.advance()
                pos = await self._send_events(group, pos, writer)
                now = time.monotonic()
                if writer.stopped:
                    break
                if writer.time_left(now) <= 0:
                    writer.cut_here(self._status_event(group, pos - 1))
                    break
                remaining = deadline - now
                if not (emu.group_status(group)["is_active"] or group.pending) or remaining <= 0:
                    break
                changed = asyncio.ensure_future(group.changed.wait())
                done, _ = await asyncio.wait(
                    [changed, gone],
                    timeout=min(remaining, KEEPALIVE_S, writer.time_left(now)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                changed.cancel()
                if not done and writer.time_left(time.monotonic()) > 0:
                    await writer.ping()
            if not gone.done():
                await writer.close(self._status_event(group, pos - 1) if snapshots else None)
        finally:
            gone.cancel()
        return 0, None

    async def _send_events(self, group: Group, pos: int, writer: SseWriter) -> int:
        """Write the log from `pos`; return the position after the last event written."""
        events = group.events
        end = len(events)
        last_status = max((i for i in range(pos, end) if events[i] is None), default=-1)
        for i in range(pos, end):
            entry = events[i]
            if entry is None:
                if i != last_status:  # older status snapshots are superseded: send only the newest
                    continue
                event = {"type": "task_group_status", "event_id": str(i), "status": self.emu.group_status(group)}
            else:
                event = self._run_event(entry, str(i), False, False)
            if not writer.add(event):
                await writer.flush()
                return i
            if writer.full:
                await writer.flush()
        await writer.flush()
        return end

    async def _run_events(self, params, query, body, receive, out):
        """State first, progress while it runs, final state (with output) when it ends."""
        emu = self.emu
        run = emu.get_run(params[0])
        writer = self._writer(out)
        await out.start_sse()
        gone = asyncio.ensure_future(self._disconnected(receive))
        try:
            if writer.add(self._run_event(run, None, False, False)) and not run.done:
                writer.add(
                    {
                        "type": "task_run.progress_msg.plan",
                        "message": "Looking up the entity.",
                        "timestamp": emu.stamp(time.monotonic()),
                    }
                )
                await writer.flush()
                fut = emu.wait_for(run)
                while not run.done and not gone.done() and not writer.cutting:
                    left = writer.time_left(time.monotonic())
                    if left <= 0:
                        writer.cut_here(self._run_event(run, None, False, True))
                        break
                    await asyncio.wait([fut, gone], timeout=min(KEEPALIVE_S, left), return_when=asyncio.FIRST_COMPLETED)
                    if not run.done and not gone.done() and writer.time_left(time.monotonic()) > 0:
                        await writer.ping()
            if gone.done():
                return 0, None
            if not writer.cutting and writer.add(
                {
                    "type": "task_run.progress_stats",
                    "progress_meter": 100.0,
                    "source_stats": {"num_sources_considered": 1, "num_sources_read": 1, "sources_read_sample": []},
                }
            ):
                writer.add(self._run_event(run, None, False, True))
            await writer.close()
        finally:
            gone.cancel()
        return 0, None
