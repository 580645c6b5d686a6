"""Stage 3, poll: submitted -> done | failed | timed_out, without a request per row.

Completions are learned from the group's event stream (one long-lived request, resumed from
the cursor kept in the journal). Outputs are fetched in bulk: completed runs accumulate for
a moment, then one runs-stream request (`status=completed&include_output=true`, starting at
the earliest batch cursor among them) returns all of them and is closed as soon as it has;
a handful of stragglers are fetched with `GET /result` instead. Failed runs carry their
error in the event itself (and, on the /result path, a 404 is explained by GET run).
Results are committed in one transaction per fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any

from enrich import failpoints
from enrich.client import TaskClient
from enrich.errors import ApiError, PermanentApiError, TransientApiError
from enrich.journal import Journal
from enrich.progress import JobState
from enrich.retry import backoff

FETCH_MIN_RUNS = 100        # fetch once this many completions wait...
FETCH_MAX_WAIT_S = 0.25     # ...or the oldest has waited this long
SMALL_FETCH = 8             # up to this many: one GET /result each
SEGMENT_GAP = 2             # batches this close share one listing


class Poller:
    def __init__(self, journal: Journal, client: TaskClient, state: JobState, *, taskgroup_id: str,
                 row_timeout_s: float, rand: random.Random | None = None):
        self.journal, self.client, self.state = journal, client, state
        self.taskgroup_id, self.row_timeout_s = taskgroup_id, row_timeout_s
        self.rand = rand or random.Random()
        self.waiting: dict[str, tuple[str, int, str, float]] = {}   # run_id -> (row_key, batch, cursor, submitted_at)
        self.wanted: dict[str, float] = {}                           # run_id to check/fetch -> since when
        self.failed: list[tuple[str, str]] = []
        self.released = state.released   # finished runs whose in-flight slot was already given back
        self.wake = asyncio.Event()
        self.cursor: str | None = journal.get("events_cursor")
        self.handoffs = 0   # how many times the submitter handed over new runs
        self._load()

    def _load(self) -> None:
        """(Re)read the runs waiting for results; check each once (a sweep), since their completion
        events may lie before the stored stream cursor (after a crash or a reconciliation)."""
        rows = self.journal.conn.execute(
            "SELECT run_id, row_key, batch, run_cursor, submitted_at FROM rows WHERE state='submitted'").fetchall()
        self.waiting = {r[0]: (r[1], r[2] or 0, r[3] or "", r[4] or time.time()) for r in rows}
        now = time.monotonic()
        for run_id in self.waiting:
            self.wanted.setdefault(run_id, now)
        if self.wanted:
            self.wake.set()

    def _drain_handoff(self) -> None:
        if self.state.reload_runs:
            self.state.reload_runs = False
            self.state.handoff.clear()
            self._load()
            return
        if self.state.handoff:
            self.handoffs += 1
        for run_id, key, batch, cursor, at in self.state.handoff:
            self.waiting[run_id] = (key, batch, cursor, at)
        self.state.handoff.clear()

    def finished(self) -> bool:
        self._drain_handoff()
        return not self.waiting and not self.wanted and not self.failed

    async def run(self) -> None:
        """Follow events, fetch results and enforce row timeouts until told to stop."""
        tasks = [asyncio.ensure_future(self._follow()), asyncio.ensure_future(self._fetch_loop()),
                 asyncio.ensure_future(self._timeouts())]
        try:
            await self.state.stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5)
            self._flush_failed()

    # ---- completion detection ---------------------------------------------------------------
    async def _follow(self) -> None:
        attempt = 0
        while True:
            self._drain_handoff()
            if not self.waiting:
                self.state.new_runs.clear()
                await self.state.new_runs.wait()
                continue
            seen = 0
            handoffs_before = self.handoffs
            try:
                async for event in self.client.group_events(self.taskgroup_id, self.cursor, timeout_s=60):
                    seen += 1
                    attempt = 0
                    self._on_event(event)
            except PermanentApiError as exc:
                self.state.fatal = exc
                self.state.stop.set()
                return
            except ApiError as exc:
                attempt += 1
                self.journal.log("warning", f"event stream: {exc}")
                await asyncio.sleep(backoff(attempt, self.rand.random(), getattr(exc, "retry_after", None)))
                continue
            self.journal.set("events_cursor", self.cursor)
            self._drain_handoff()
            if seen <= 1 and self.waiting and self.handoffs == handoffs_before:
                # the stream closed with nothing new and no run was added meanwhile: sweep the waiting
                # runs once, then wait for new runs (or a moment) before listening again
                for run_id in list(self.waiting):
                    self.wanted.setdefault(run_id, time.monotonic())
                self.wake.set()
                self.state.new_runs.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.state.new_runs.wait(), 0.5)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event_id"):
            self.cursor = str(event["event_id"])
        if event.get("type") != "task_run.state":
            return
        run = event.get("run") or {}
        run_id = run.get("run_id")
        if run.get("is_active", True) or (run_id not in self.waiting and not self._late(run_id)):
            return
        status = run.get("status")
        if run_id not in self.released:
            # the run is no longer active at the API: its slot is free now, not when its output arrives
            self.released.add(run_id)
            self.state.freed(1)
        if status == "completed":
            if run_id not in self.wanted:
                self.wanted[run_id] = time.monotonic()
                if len(self.wanted) >= FETCH_MIN_RUNS or len(self.wanted) == 1:
                    self.wake.set()
        elif status in ("failed", "cancelled"):
            self.failed.append((run_id, _run_error(run)))
            self.wake.set()

    def _late(self, run_id: Any) -> bool:
        """A run submitted by this process whose handoff has not been drained yet."""
        if not isinstance(run_id, str):
            return False
        self._drain_handoff()
        return run_id in self.waiting

    # ---- result fetching --------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        attempt = 0
        while True:
            if not self.wanted and not self.failed:
                self.wake.clear()
                await self.wake.wait()
            if self.wanted:
                oldest = min(self.wanted.values())
                delay = FETCH_MAX_WAIT_S - (time.monotonic() - oldest)
                if len(self.wanted) < FETCH_MIN_RUNS and delay > 0:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), delay)
            self._flush_failed()
            if not self.wanted:
                continue
            try:
                await self._fetch(dict(self.wanted))
                attempt = 0
            except ApiError as exc:
                attempt += 1
                self.journal.log("warning", f"fetching results: {exc}")
                await asyncio.sleep(backoff(attempt, self.rand.random(), getattr(exc, "retry_after", None)))

    async def _fetch(self, want: dict[str, float]) -> None:
        """Fetch results for `want`; whatever arrived is recorded even if a request fails midway."""
        self._drain_handoff()
        ids = [r for r in want if r in self.waiting]
        for r in want:
            if r not in self.waiting:
                self.wanted.pop(r, None)
        done: list[tuple[str, str]] = []
        failed: list[tuple[str, str]] = []
        active: list[str] = []
        try:
            singles = await self._list(ids, done, failed, active)
            for rid in singles:
                await self._one(rid, done, failed, active)
        finally:
            for rid in active:
                self.wanted.pop(rid, None)   # still running: its completion event will come
            failpoints.hit("mid_poll")
            if done or failed:
                self.journal.record(done, failed, time.time())
                failpoints.hit("after_result_commit")
            self._finish([rid for rid, _ in done + failed])
            self.state.completed += len(done)
            self.state.failed += len(failed)

    async def _list(self, ids: list[str], done: list[tuple[str, str]], failed: list[tuple[str, str]],
                    active: list[str]) -> list[str]:
        """Read results from the group's run listing, one listing per run of neighbouring batches.

        Each listing starts at its first batch's cursor and is closed as soon as its runs were
        all seen, so it reads about as many events as those batches hold, however old they are.
        Returns the runs left to ask for one by one (segments too small to be worth a listing).
        """
        by_batch: dict[int, list[str]] = {}
        for rid in ids:
            by_batch.setdefault(self.waiting[rid][1], []).append(rid)
        segments: list[list[int]] = []
        for batch in sorted(by_batch):
            if segments and batch - segments[-1][-1] <= SEGMENT_GAP:
                segments[-1].append(batch)
            else:
                segments.append([batch])
        singles: list[str] = []
        for seg in segments:
            need = {rid for b in seg for rid in by_batch[b]}
            if len(need) <= SMALL_FETCH:
                singles.extend(need)
                continue
            start = self.waiting[by_batch[seg[0]][0]][2]
            async for event in self.client.group_runs(self.taskgroup_id, last_event_id=start or None,
                                                      include_output=True):
                run = event.get("run") or {}
                rid = run.get("run_id")
                if rid not in need:
                    continue
                need.discard(rid)
                status = run.get("status")
                if status == "completed" and isinstance(event.get("output"), dict):
                    done.append((rid, json.dumps({"run": run, "output": event["output"]}, ensure_ascii=False)))
                elif status in ("failed", "cancelled"):
                    failed.append((rid, _run_error(run)))
                else:
                    active.append(rid)
                if not need:
                    break
            singles.extend(need)   # not listed (should not happen): ask for each
        return singles

    async def _one(self, rid: str, done: list[tuple[str, str]], failed: list[tuple[str, str]],
                   active: list[str]) -> None:
        """GET /result for one run (timeout 0); a 404 is explained by GET run. Transient errors
        leave the run wanted for the next round."""
        try:
            res = await self.client.result(rid, timeout_s=0)
        except PermanentApiError as exc:
            if exc.status != 404:
                raise
            try:
                run = await self.client.get_run(rid)   # 404 on /result: failed, or unknown
            except TransientApiError:
                return
            if run.get("is_active"):
                active.append(rid)
            else:
                failed.append((rid, _run_error(run)))
            return
        except TransientApiError:
            return
        if res is None:
            active.append(rid)
        else:
            done.append((rid, json.dumps(res, ensure_ascii=False)))

    def _flush_failed(self) -> None:
        if not self.failed:
            return
        batch, self.failed = self.failed, []
        batch = [(rid, err) for rid, err in batch if rid in self.waiting]
        if not batch:
            return
        self.journal.record([], batch, time.time())
        self._finish([rid for rid, _ in batch])
        self.state.failed += len(batch)

    def _finish(self, run_ids: list[str]) -> None:
        """Forget recorded runs, giving back the slots of those not released on their event."""
        unreleased = 0
        for rid in run_ids:
            self.wanted.pop(rid, None)
            self.waiting.pop(rid, None)
            if rid in self.released:
                self.released.discard(rid)
            else:
                unreleased += 1
        self.state.freed(unreleased)   # also wakes the submitter: the backlog shrank

    # ---- deadlines ---------------------------------------------------------------------------
    async def _timeouts(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.row_timeout_s / 10))
            now = time.time()
            expired = self.journal.time_out(now - self.row_timeout_s, now)
            self._finish(expired)
            self.state.failed += len(expired)


def _run_error(run: dict[str, Any]) -> str:
    """The row error for a run that ended without a result."""
    err = run.get("error")
    message = err.get("message") if isinstance(err, dict) else None
    return f"run {run.get('status')}: {message or 'no error detail from the API'}"


__all__ = ["Poller", "TransientApiError"]
