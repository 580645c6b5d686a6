"""Stage 3, poll: submitted -> done | failed | timed_out, without a request per row.

Completions are learned from the group's event stream (one long-lived request, resumed from
the cursor kept in the journal; the stream may end at any moment, with or without a status
snapshot, and is simply reopened). Outputs are fetched in bulk: completed runs accumulate for a
moment, then one runs-listing request (`include_output=true`, from the earliest batch cursor
among them) returns all of them; a handful of stragglers are fetched with `GET /result`.

Correctness under every legal server behaviour:
- Each result is attributed to the row its run's metadata names (`enrich_row`, `enrich_try`),
  never by position; a run whose metadata names no row of this job is refused and logged.
- A completion is never dropped: a run an event reported finished stays wanted even when a
  listing (possibly started earlier, or eventually consistent) still shows it running.
- Liveness: a watchdog asks for the group's status every `recheck_s`; when the API says no run
  is active, every waiting run is fetched; and every waiting run is re-checked at least every
  `sweep_s` whatever the streams did. So when every run has finished at the API, the job ends
  within about `recheck_s` + one listing, whatever the stream framing.
- A row times out only when the API says its run is still active after `row_timeout_s`.
- Only transient errors are retried here; anything else (401/402/403...) stops the job at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from enrich import failpoints
from enrich.client import TaskClient
from enrich.errors import ApiError, PermanentApiError, TransientApiError
from enrich.journal import Finished, Journal
from enrich.progress import JobState
from enrich.retry import backoff

FETCH_MIN_RUNS = 100  # fetch once this many completions wait...
FETCH_MAX_WAIT_S = 0.25  # ...or the oldest has waited this long
SMALL_FETCH = 8  # up to this many: one GET /result each
SEGMENT_GAP = 2  # batches this close share one listing
STALE_RETRY_S = 0.5  # a run reported finished but listed running: ask again after this
MIN_CONNECTION_S = 1.0  # an events connection shorter than this waits before reconnecting
TERMINAL = ("completed", "failed", "cancelled")


class Poller:
    def __init__(
        self,
        journal: Journal,
        client: TaskClient,
        state: JobState,
        *,
        taskgroup_id: str,
        job_tag: str,
        row_timeout_s: float,
        recheck_s: float = 5.0,
        sweep_s: float = 30.0,
        rand: random.Random | None = None,
        on_recorded: Callable[[], object] | None = None,
    ):
        self.journal, self.client, self.state = journal, client, state
        self.on_recorded = on_recorded  # after results are committed (the shared cache is written: reuse.py)
        self.taskgroup_id, self.job_tag, self.row_timeout_s = taskgroup_id, job_tag, row_timeout_s
        self.recheck_s, self.sweep_s = recheck_s, sweep_s
        self.rand = rand or random.Random()
        self.waiting: dict[str, tuple[int, str, float]] = {}  # run_id -> (batch, cursor, created_at wall time)
        self.wanted: dict[str, float] = {}  # run_id to fetch -> not before (monotonic)
        self.ended: set[str] = set()  # the API said these runs finished (slot given)
        self.checked: dict[str, float] = {}  # run_id -> last time a fetch looked at it
        self.failed: list[Finished] = []
        self.wake = asyncio.Event()
        self.cursor: str | None = journal.get("events_cursor")
        self._load()

    def _load(self) -> None:
        """(Re)read the runs waiting for results; check each once (a sweep), since their completion
        events may lie before the stored stream cursor (after a crash or a reconciliation)."""
        self.waiting = {r[0]: (r[1], r[2], r[3]) for r in self.journal.waiting_runs()}
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
        for run_id, batch, cursor, at in self.state.handoff:
            self.waiting[run_id] = (batch, cursor, at)
        self.state.handoff.clear()

    async def run(self) -> None:
        """Follow events, fetch results and watch liveness and timeouts until told to stop."""
        tasks = [
            asyncio.ensure_future(self._follow()),
            asyncio.ensure_future(self._fetch_loop()),
            asyncio.ensure_future(self._watch()),
        ]
        try:
            await self.state.stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5)

    def _fatal(self, exc: BaseException) -> None:
        self.journal.log("error", str(exc))
        self.state.fatal = exc
        self.state.stop.set()

    # ---- completion detection ---------------------------------------------------------------
    async def _follow(self) -> None:
        attempt = 0
        while True:
            self._drain_handoff()
            if not self.waiting:
                self.state.new_runs.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.state.new_runs.wait(), 1.0)
                continue
            opened = time.monotonic()
            try:
                async for event in self.client.group_events(self.taskgroup_id, self.cursor, timeout_s=60):
                    attempt = 0
                    self._on_event(event)
            except TransientApiError as exc:
                attempt += 1
                self.journal.log("warning", f"event stream: {exc}")
                await asyncio.sleep(backoff(attempt, self.rand.random(), exc.retry_after, cap=10))
                continue
            except ApiError as exc:
                self._fatal(exc)
                return
            self.journal.set("events_cursor", self.cursor)
            # a stream may legally end at any time; never reconnect in a tight loop
            if (left := MIN_CONNECTION_S - (time.monotonic() - opened)) > 0:
                self.state.new_runs.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.state.new_runs.wait(), left)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event_id"):
            self.cursor = str(event["event_id"])
        if event.get("type") != "task_run.state":
            return
        run = event.get("run") or {}
        run_id = run.get("run_id")
        if not isinstance(run_id, str) or run.get("status") not in TERMINAL:
            return
        if run_id not in self.waiting:
            self._drain_handoff()
            if run_id not in self.waiting:
                return
        self._ended(run_id)
        if run["status"] == "completed":
            if run_id not in self.wanted:
                self.wanted[run_id] = time.monotonic()
                if len(self.wanted) >= FETCH_MIN_RUNS or len(self.wanted) == 1:
                    self.wake.set()
        else:
            self.failed.append(self._finished(run, error=_run_error(run)))
            self.wake.set()

    def _ended(self, run_id: str) -> None:
        """The API no longer works on this run: its active slot is free now, not when its output arrives."""
        if run_id not in self.ended:
            self.ended.add(run_id)
            self.state.active.give(1)

    def _finished(self, run: dict[str, Any], result_json: str | None = None, error: str | None = None) -> Finished:
        """A Finished attributed by the run's own metadata (None fields when it carries none of ours)."""
        meta: dict[str, Any] = run["metadata"] if isinstance(run.get("metadata"), dict) else {}
        ref, attempt = meta.get("enrich_row"), meta.get("enrich_try")
        ours = meta.get("enrich_job") == self.job_tag and isinstance(ref, str)
        try:
            attempt = int(attempt) if ours and attempt is not None else None
        except (TypeError, ValueError):
            attempt = None
        return Finished(str(run.get("run_id")), ref if ours else None, attempt, result_json, error)

    # ---- liveness and deadlines -------------------------------------------------------------
    async def _watch(self) -> None:
        """Every `recheck_s`: if the group has no active run, fetch every waiting run; re-check runs not
        looked at for `sweep_s`; time out (only) runs the API says are still active after row_timeout_s."""
        attempt = 0
        while True:
            await asyncio.sleep(self.recheck_s)
            self._drain_handoff()
            if not self.waiting:
                self._settle_orphans()
                continue
            now = time.monotonic()
            try:
                group = await self.client.get_group(self.taskgroup_id)
                attempt = 0
            except TransientApiError as exc:
                attempt += 1
                self.journal.log("warning", f"group status: {exc}")
                continue
            except ApiError as exc:
                self._fatal(exc)
                return
            status: dict[str, Any] = group["status"] if isinstance(group.get("status"), dict) else {}
            idle = status.get("is_active") is False
            for run_id in list(self.waiting):
                if idle or now - self.checked.get(run_id, now - self.sweep_s / 2) >= self.sweep_s:
                    self.wanted.setdefault(run_id, now)
                    self.checked[run_id] = now
            if self.wanted:
                self.wake.set()
            try:
                await self._timeouts()
            except TransientApiError as exc:
                self.journal.log("warning", f"checking overdue runs: {exc}")
            except ApiError as exc:
                self._fatal(exc)
                return

    async def _timeouts(self) -> None:
        limit = time.time() - self.row_timeout_s
        overdue = [rid for rid, (_, _, at) in self.waiting.items() if at < limit and rid not in self.ended]
        for rid in overdue[:50]:  # bounded per round; a paused laptop wakes up to many
            try:
                run = await self.client.get_run(rid)
            except PermanentApiError as exc:
                if exc.status == 404:
                    continue
                raise
            if run.get("status") in TERMINAL:
                self.wanted.setdefault(rid, time.monotonic())  # it finished: fetch, never time out
                self.wake.set()
                continue
            f = self._finished(run)
            self.journal.time_out(rid, f.row_ref, f.attempt, time.time())
            self.state.reused = self.journal.reused_moves
            self.journal.log("warning", f"run {rid} still active after row_timeout_s: row timed out")
            self._forget([rid])
            self.state.failed += 1

    def _settle_orphans(self) -> None:
        """Submitted rows none of whose runs is waiting any more go to reconciliation (by metadata)."""
        orphans = self.journal.orphaned_submitted()
        if orphans:
            self.journal.unknown_from_submitted(
                orphans, "no run of the group was attributed to this row; looking for it by metadata"
            )
            self.state.unresolved.set()

    # ---- result fetching --------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        attempt = 0
        while True:
            now = time.monotonic()
            due = {r: t for r, t in self.wanted.items() if t <= now}
            if not due and not self.failed:
                self.wake.clear()
                nxt = min(self.wanted.values(), default=now + 1.0) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(nxt, 0.01))
                continue
            if due and len(due) < FETCH_MIN_RUNS and (left := FETCH_MAX_WAIT_S - (now - min(due.values()))) > 0:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), left)
                due = {r: t for r, t in self.wanted.items() if t <= time.monotonic()}
            try:
                self._flush_failed()
                if due:
                    await self._fetch(due)
                attempt = 0
            except TransientApiError as exc:
                attempt += 1
                self.journal.log("warning", f"fetching results: {exc}")
                await asyncio.sleep(backoff(attempt, self.rand.random(), exc.retry_after, cap=10))
            except ApiError as exc:
                self._fatal(exc)
                return

    async def _fetch(self, want: dict[str, float]) -> None:
        """Fetch results for `want`; whatever arrived is recorded even if a request fails midway."""
        self._drain_handoff()
        for r in want:
            if r not in self.waiting:
                self.wanted.pop(r, None)
        ids = [r for r in want if r in self.waiting]
        got: list[Finished] = []
        running: list[str] = []
        try:
            singles = await self._list(ids, got, running)
            for rid in singles:
                await self._one(rid, got, running)
        finally:
            now = time.monotonic()
            for rid in running:
                if rid in self.ended:  # an event said finished: the listing is stale, ask again soon
                    self.wanted[rid] = now + STALE_RETRY_S
                else:  # still running: its completion event (or the watchdog) will come
                    self.wanted.pop(rid, None)
            failpoints.hit("mid_poll")
            self._record(got)

    def _record(self, finished: list[Finished]) -> None:
        if not finished:
            return
        _, refused = self.journal.record(finished, time.time())
        failpoints.hit("after_result_commit")
        self.state.reused = self.journal.reused_moves
        if self.on_recorded is not None and any(f.result_json is not None for f in finished):
            self.on_recorded()
        for rid in refused:
            self.journal.log("error", f"run {rid}: its metadata names no row of this job; result not used")
        self._forget([f.run_id for f in finished])
        self.state.completed += sum(1 for f in finished if f.result_json is not None and f.run_id not in refused)
        self.state.failed += sum(1 for f in finished if f.result_json is None)

    async def _list(self, ids: list[str], got: list[Finished], running: list[str]) -> list[str]:
        """Read results from the group's run listing, one listing per run of neighbouring batches.

        Each listing starts at its first batch's cursor and is closed as soon as its runs were
        all seen. Returns the runs left to ask for one by one (small segments, or not listed).
        """
        by_batch: dict[int, list[str]] = {}
        for rid in ids:
            by_batch.setdefault(self.waiting[rid][0], []).append(rid)
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
            start = min(self.waiting[rid][1] for rid in by_batch[seg[0]])
            async for event in self.client.group_runs(
                self.taskgroup_id, last_event_id=start or None, include_output=True
            ):
                run = event.get("run") or {}
                if (seen_id := run.get("run_id")) not in need:
                    continue
                need.discard(seen_id)
                self._classify(run, event.get("output"), got, running)
                if not need:
                    break
            singles.extend(need)  # not listed yet (eventual consistency): ask for each
        return singles

    def _classify(self, run: dict[str, Any], output: Any, got: list[Finished], running: list[str]) -> None:
        rid = str(run.get("run_id"))
        status = run.get("status")
        if status == "completed" and isinstance(output, dict):
            self._ended(rid)
            got.append(self._finished(run, json.dumps({"run": run, "output": output}, ensure_ascii=False)))
        elif status in ("failed", "cancelled"):
            self._ended(rid)
            got.append(self._finished(run, error=_run_error(run)))
        else:
            running.append(rid)

    async def _one(self, rid: str, got: list[Finished], running: list[str]) -> None:
        """GET /result for one run (timeout 0); a 404 is explained by GET run. Transient errors and runs
        not visible yet leave the run wanted for a later round."""
        try:
            res = await self.client.result(rid, timeout_s=0)
        except PermanentApiError as exc:
            if exc.status != 404:
                raise
            try:
                run = await self.client.get_run(rid)  # 404 on /result: failed, cancelled, or not visible yet
            except PermanentApiError as exc2:
                if exc2.status != 404:
                    raise
                self.wanted[rid] = time.monotonic() + STALE_RETRY_S
                return
            self._classify(run, None, got, running)
            return
        except TransientApiError:
            self.wanted[rid] = time.monotonic() + STALE_RETRY_S
            return
        if res is None:
            running.append(rid)
        else:
            run = res["run"] if isinstance(res.get("run"), dict) else {}
            self._ended(rid)
            got.append(self._finished({**run, "run_id": rid}, json.dumps(res, ensure_ascii=False)))

    def _flush_failed(self) -> None:
        batch, self.failed = self.failed, []
        self._record([f for f in batch if f.run_id in self.waiting])

    def _forget(self, run_ids: list[str]) -> None:
        """Recorded (or timed out) runs: give back their backlog slot, and the active one if still held."""
        n = 0
        for rid in run_ids:
            self.wanted.pop(rid, None)
            self.checked.pop(rid, None)
            if self.waiting.pop(rid, None) is None:
                continue
            n += 1
            if rid in self.ended:
                self.ended.discard(rid)
            else:
                self.state.active.give(1)
        self.state.backlog.give(n)


def _run_error(run: dict[str, Any]) -> str:
    """The row error for a run that ended without a result."""
    err = run.get("error")
    message = err.get("message") if isinstance(err, dict) else None
    return f"run {run.get('status')}: {message or 'no error detail from the API'}"
