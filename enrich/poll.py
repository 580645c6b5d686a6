"""Stage 3, poll: submitted -> done | failed | timed_out, without a request per row.

Completions are learned from the group's event stream (one long-lived request, resumed from
the cursor kept in the journal; the stream may end at any moment, with or without a status
snapshot, and is simply reopened). Outputs are fetched in bulk: completed runs accumulate for a
moment, then one runs-listing request (`include_output=true`, from the earliest batch cursor
among them) returns all of them; a handful of stragglers are fetched with `GET /result`.

Correctness under every legal server behaviour:
- Each result is attributed to the row its run's metadata names (`enrich_row`, `enrich_try`, read
  tolerantly: runmeta.py), never by position. A reply without metadata (the spec makes it optional)
  is attributed by run id: from this run's own events or listing entries, or a pairing the journal
  has proven; failing both, the run is looked up in a listing, which carries it. A run whose
  metadata names no row of this job is refused and logged.
- A completion is never dropped: a run an event reported finished stays wanted even when a
  listing (possibly started earlier, or eventually consistent) still shows it running.
- Liveness: a watchdog asks for the group's status every `recheck_s`; when the API says no run
  is active, every waiting run is fetched; and every waiting run is re-checked at least every
  `sweep_s` whatever the streams did. So when every run has finished at the API, the job ends
  within about `recheck_s` + one listing, whatever the stream framing.
- A run in `action_required` is not active and no one in a batch can act: once it has been seen
  there on two watchdog rounds while no run of the group is active (or past `row_timeout_s`), its row ends
  `action_required` with the API's message, and the next run of the job asks for it again.
- A row times out only when the API says its run is still active after `row_timeout_s`.
- An expired cursor (422 on a stream opened with `last_event_id`) is dropped: the stream is opened
  again from the group's beginning.
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
from enrich.runmeta import Owner, owner

FETCH_MIN_RUNS = 100  # fetch once this many completions wait...
FETCH_MAX_WAIT_S = 0.25  # ...or the oldest has waited this long
SMALL_FETCH = 8  # up to this many: one GET /result each
SEGMENT_GAP = 2  # batches this close share one listing
STALE_RETRY_S = 0.5  # a run reported finished but listed running: ask again after this
MIN_CONNECTION_S = 1.0  # an events connection shorter than this waits before reconnecting
TERMINAL = ("completed", "failed", "cancelled")
HELD = "action_required"  # not active and not terminal: waits for someone to act at the API


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
        self.owners: dict[str, Owner] = {}  # run_id -> the row its events or listing entries named
        self.unnamed: set[str] = set()  # runs whose result named no row: looked up in a listing
        self.unreadable: set[str] = set()  # runs whose enrich_try could not be read (logged once)
        self.expired: set[str] = set()  # runs-listing cursors the API said had expired
        self.idle = False  # the last group status said no run is active (and no run was added since)
        self.added = 0  # handoffs of new runs so far (a group status read before one is stale)
        self.held: dict[str, tuple[float, str]] = {}  # run_id in action_required -> (first seen, row error)
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
        if self.state.handoff:
            self.idle = False  # new runs: the group is active again
            self.added += 1
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
                if exc.status == 422 and self.cursor:  # how long a cursor lives is not documented: start over
                    self.journal.log("warning", f"event stream: {exc}; reading the group's events from the start")
                    self.cursor = None
                    self.journal.set("events_cursor", None)
                    continue
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
        if event.get("type") == "error":  # the stream ends after it, or goes on: either way it is reopened
            err = event.get("error")
            self.journal.log(
                "warning", f"event stream: error event: {err.get('message') if isinstance(err, dict) else err}"
            )
            return
        if event.get("type") != "task_run.state":
            return
        raw = event.get("run")
        run: dict[str, Any] = raw if isinstance(raw, dict) else {}
        run_id = run.get("run_id")
        if isinstance(run_id, str):
            self._learn(run_id, run)
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
            f = self._finished(run, error=_run_error(run))
            if f.row_ref is None:  # named by nothing yet: a listing will name it
                self.unnamed.add(run_id)
                self.wanted.setdefault(run_id, time.monotonic())
            else:
                self.failed.append(f)
            self.wake.set()

    def _ended(self, run_id: str) -> None:
        """The API no longer works on this run: its active slot is free now, not when its output arrives."""
        if run_id not in self.ended:
            self.ended.add(run_id)
            self.state.active.give(1)

    def _learn(self, run_id: str, run: dict[str, Any]) -> None:
        """Remember the row a run object of this run names (a later reply may leave its metadata out)."""
        who = owner(run, self.job_tag)
        if who is not None and who.attempt is not None and run_id in self.waiting:
            self.owners[run_id] = who

    def _finished(self, run: dict[str, Any], result_json: str | None = None, error: str | None = None) -> Finished:
        """A Finished attributed by the run's own metadata or, where it names no row, by run id: this run's
        earlier events and listing entries, else the journal's pairings (None fields when nothing names it)."""
        run_id = str(run.get("run_id"))
        who = owner(run, self.job_tag) or self.owners.get(run_id)
        if who is not None and who.attempt is None and run_id not in self.unreadable:
            self.unreadable.add(run_id)
            self.journal.log(
                "warning",
                f"run {run_id}: enrich_try {who.raw_attempt!r} cannot be read; matched by run id to row "
                f"{who.row_ref}'s current attempt",
            )
        hit = (
            self.journal.attribute(run_id, who.row_ref, who.attempt)
            if who
            else self.journal.attribute(run_id, None, None)
        )
        return Finished(run_id, hit[0] if hit else None, hit[1] if hit else None, result_json, error)

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
            added = self.added
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
            self.idle = idle and self.added == added and not self.state.handoff  # else the status is stale
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
            if run.get("status") == HELD:  # not active: it waits for an action, it is not running late
                self._note_held(rid, run)
                self._hold([rid], force=True)
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
            self._hold([rid for rid in running if rid in self.held])

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
            if len(need) <= SMALL_FETCH and not need & self.unnamed:
                singles.extend(need)
                continue
            start: str | None = min(self.waiting[rid][1] for rid in by_batch[seg[0]]) or None
            if start in self.expired:
                start = None
            try:
                await self._scan(start, need, got, running)
            except PermanentApiError as exc:
                if exc.status != 422 or start is None:
                    raise
                # how long a cursor lives is not documented: list the group from its beginning instead
                self.journal.log("warning", f"fetching results: {exc}; listing the group from the start")
                self.expired.add(start)
                await self._scan(None, need, got, running)
            singles.extend(need)  # not listed yet (eventual consistency): ask for each
        return singles

    async def _scan(self, start: str | None, need: set[str], got: list[Finished], running: list[str]) -> None:
        """Read one runs listing from `start` until every run of `need` was seen (each seen one leaves `need`)."""
        async for event in self.client.group_runs(self.taskgroup_id, last_event_id=start, include_output=True):
            raw = event.get("run")
            run: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if (seen_id := run.get("run_id")) not in need:
                continue
            need.discard(seen_id)
            self._learn(seen_id, run)
            self._classify(run, event.get("output"), got, running, listed=True)
            if not need:
                break

    def _classify(
        self, run: dict[str, Any], output: Any, got: list[Finished], running: list[str], listed: bool = False
    ) -> None:
        """File one run object: finished (into `got`, attributed), or still to wait for (`running`). A result
        naming no row, outside a listing, is left to a listing (`unnamed`), which names it."""
        rid = str(run.get("run_id"))
        status = run.get("status")
        if status == "completed" and isinstance(output, dict):
            f = self._finished(run, json.dumps({"run": run, "output": output}, ensure_ascii=False))
        elif status in ("failed", "cancelled"):
            f = self._finished(run, error=_run_error(run))
        else:
            if status == HELD:
                self._note_held(rid, run)
            else:
                self.held.pop(rid, None)
            running.append(rid)
            return
        self.held.pop(rid, None)
        self._ended(rid)
        if f.row_ref is None and not listed:
            self.unnamed.add(rid)
            self.wanted[rid] = time.monotonic() + STALE_RETRY_S
            return
        got.append(f)

    def _note_held(self, rid: str, run: dict[str, Any]) -> None:
        """A run seen in action_required: remember since when, and the row error its message makes."""
        self._learn(rid, run)
        since = self.held[rid][0] if rid in self.held else time.monotonic()
        self.held[rid] = (since, _run_error(run))

    def _hold(self, run_ids: list[str], force: bool = False) -> None:
        """End the rows of runs waiting for an action once no run of the group is active and they were seen
        waiting on two watchdog rounds (or at once with `force`: past row_timeout_s); the next run asks again."""
        now = time.monotonic()
        for rid in run_ids:
            since, error = self.held.get(rid, (now, "run action_required"))
            if rid not in self.waiting or not (force or (self.idle and now - since >= self.recheck_s / 2)):
                continue
            f = self._finished({"run_id": rid})
            if f.row_ref is None or f.attempt is None:
                continue  # named by nothing yet: its listing entry or event will name it
            self.journal.hold(rid, f.row_ref, f.attempt, error, time.time())
            self.journal.log("warning", f"run {rid} waits for an action at the API: row {f.row_ref} {error}")
            self._forget([rid])
            self.state.failed += 1

    async def _one(self, rid: str, got: list[Finished], running: list[str]) -> None:
        """GET /result for one run (timeout 0); a 404 is explained by GET run, and so is a 408 while the group
        has no active run (the run may wait in action_required). Transient errors and runs not visible yet
        leave the run wanted for a later round."""
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
        if res is None and self.idle and rid not in self.ended:
            try:
                run = await self.client.get_run(rid)
            except (PermanentApiError, TransientApiError):
                running.append(rid)
                return
            self._classify({**run, "run_id": rid}, None, got, running)
        elif res is None:
            running.append(rid)
        else:
            run = res["run"] if isinstance(res.get("run"), dict) else {}
            f = self._finished({**run, "run_id": rid}, json.dumps(res, ensure_ascii=False))
            self._ended(rid)
            if f.row_ref is None:  # the result names no row, and nothing else has: a listing will
                self.unnamed.add(rid)
                self.wanted[rid] = time.monotonic() + STALE_RETRY_S
                return
            got.append(f)

    def _flush_failed(self) -> None:
        batch, self.failed = self.failed, []
        self._record([f for f in batch if f.run_id in self.waiting])

    def _forget(self, run_ids: list[str]) -> None:
        """Recorded (or timed out) runs: give back their backlog slot, and the active one if still held."""
        n = 0
        for rid in run_ids:
            self.wanted.pop(rid, None)
            self.checked.pop(rid, None)
            self.owners.pop(rid, None)
            self.unnamed.discard(rid)
            self.held.pop(rid, None)
            if self.waiting.pop(rid, None) is None:
                continue
            n += 1
            if rid in self.ended:
                self.ended.discard(rid)
            else:
                self.state.active.give(1)
        self.state.backlog.give(n)


def _run_error(run: dict[str, Any]) -> str:
    """The row error for a run that ended without a result (or waits for an action): the API's message, from
    its error or, failing that, its warnings."""
    err = run.get("error")
    message = err.get("message") if isinstance(err, dict) else None
    if not message and isinstance(run.get("warnings"), list):
        notes = [w.get("message") for w in run["warnings"] if isinstance(w, dict) and w.get("message")]
        message = "; ".join(str(n) for n in notes)
    return f"run {run.get('status')}: {message or 'no error detail from the API'}"
