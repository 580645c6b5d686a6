"""Settle rows whose add-runs outcome is unknown, against the task group's run listing.

The API has no idempotency key, so a lost reply may or may not have created paid runs.
Every run carries `metadata = {enrich_job, enrich_row, enrich_try}` (runmeta.py); the group's runs
stream echoes it. A row found there is adopted (no resubmit). A row is declared missing only
when its intent is older than the grace period (longer than the request timeout, so a
request still in flight cannot land after the decision) and two consecutive *complete* listings
agree. A listing is evidence of absence only when it ended normally (at an event boundary, no
transport error), carried no `error` event (the spec allows them in listings) and showed at least
as many runs as the group counted before it began; any other listing proves nothing about the runs
it did not show, and the round is retried (`Outcome.incomplete`).
Rows whose creating POST is still in flight (`posting`) are not examined at all, and a release
names the attempt it examined, so a decision about an older attempt never moves a newer one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from enrich.client import StreamEnd, TaskClient
from enrich.journal import Journal, Unresolved
from enrich.runmeta import owner


@dataclass
class Outcome:
    adopted: int = 0
    missing: int = 0
    waiting: int = 0
    next_check: float | None = None  # wall time when waiting rows pass the grace period
    incomplete: str = ""  # why rows past the grace period could not be settled: a listing was incomplete


@dataclass
class Listing:
    """This job's runs one runs listing showed, and whether it showed every run of the group (`complete`;
    `why` not). `found`: (enrich_row, enrich_try) -> (run_id, cursor before that run); `loose`: enrich_row ->
    (run_id, cursor) for runs of ours whose enrich_try could not be read (`unreadable`: run_id -> the value)."""

    found: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    loose: dict[str, tuple[str, str]] = field(default_factory=dict)
    unreadable: dict[str, object] = field(default_factory=dict)
    why: str = ""

    @property
    def complete(self) -> bool:
        return not self.why

    def run_for(self, row: Unresolved) -> tuple[str, str] | None:
        """The run this listing showed for the row's attempt. A run of the row whose try is unreadable is
        taken for its first attempt only (no earlier attempt can own it)."""
        hit = self.found.get((row.row_ref, row.attempt))
        return hit if hit is not None or row.attempt != 1 else self.loose.get(row.row_ref)

    def unsure(self, row: Unresolved) -> bool:
        """A run of this row with an unreadable try was shown: the row is not proven missing."""
        return row.row_ref in self.loose


async def list_refs(client: TaskClient, taskgroup_id: str, job_tag: str) -> Listing:
    """List the whole group once: this job's runs by (enrich_row, enrich_try), and whether the listing was
    complete (ended normally, no `error` event, at least the group's run count as read just before)."""
    group = await client.get_group(taskgroup_id)
    status = group.get("status") if isinstance(group, dict) else None
    counted = status.get("num_task_runs") if isinstance(status, dict) else None
    out = Listing()
    end = StreamEnd()
    seen: set[str] = set()
    prev = ""
    async for event in client.group_runs(taskgroup_id, end=end):
        if event.get("type") != "task_run.state":
            continue
        raw = event.get("run")
        run: dict[str, Any] = raw if isinstance(raw, dict) else {}
        run_id = run.get("run_id")
        if isinstance(run_id, str):
            seen.add(run_id)
            if (who := owner(run, job_tag)) is not None:
                if who.attempt is None:
                    out.loose.setdefault(who.row_ref, (run_id, prev))
                    out.unreadable[run_id] = who.raw_attempt
                else:
                    out.found.setdefault((who.row_ref, who.attempt), (run_id, prev))
        prev = str(event.get("event_id") or prev)
    if end.errors:
        out.why = f"the runs listing ended with an error event ({end.errors[0]})"
    elif not end.clean:
        out.why = "the runs listing ended inside an event"
    elif isinstance(counted, int) and not isinstance(counted, bool) and len(seen) < counted:
        out.why = f"the runs listing showed {len(seen)} of the group's {counted} runs"
    return out


async def reconcile(
    journal: Journal,
    client: TaskClient,
    taskgroup_id: str,
    job_tag: str,
    grace_s: float,
    max_retries: int,
    now: float | None = None,
    posting: set[str] | None = None,
) -> Outcome:
    """Adopt listed runs, release rows two complete listings prove missing, and report rows still inside the
    grace period (`waiting`) or past it but not provably missing (`incomplete`)."""
    posting = posting if posting is not None else set()
    rows = [r for r in journal.unresolved() if r.row_key not in posting]
    out = Outcome()
    if not rows:
        return out
    now = time.time() if now is None else now
    found = await list_refs(client, taskgroup_id, job_tag)
    out.adopted = _adopt(journal, rows, found)
    candidates = [r for r in rows if found.run_for(r) is None and now - r.intent_at >= grace_s]
    if candidates:
        again = await list_refs(client, taskgroup_id, job_tag)  # the second, confirming listing
        candidates = [r for r in candidates if r.row_key not in posting]
        out.adopted += _adopt(journal, candidates, again)
        left = [r for r in candidates if again.run_for(r) is None]
        if left and not (found.complete and again.complete):
            out.incomplete = found.why or again.why  # no evidence of absence: the rows stay in doubt
            left = []
        unsure = [r for r in left if found.unsure(r) or again.unsure(r)]
        if unsure:  # a run of the row was shown, only its try is unreadable: never taken for missing
            out.incomplete = f"a run of row {unsure[0].row_ref} has an enrich_try that cannot be read"
        missing = [r for r in left if r not in unsure]
        if missing:
            # a lost request says nothing about the row: it does not count toward the row's retry limit
            journal.release(
                [(r.row_key, r.attempt) for r in missing],
                time.time(),
                None,
                "the run was never created (confirmed by two complete listings)",
                max_retries,
                count_retry=False,
            )
        out.missing = len(missing)
    waiting = [r for r in rows if found.run_for(r) is None and now - r.intent_at < grace_s]
    out.waiting = len(waiting)
    if waiting:
        out.next_check = min(r.intent_at for r in waiting) + grace_s
    return out


def _adopt(journal: Journal, rows: list[Unresolved], listing: Listing) -> int:
    hits = [(r, hit) for r in rows if (hit := listing.run_for(r)) is not None]
    if hits:
        journal.adopt([(r.row_key, r.attempt, *hit) for r, hit in hits], time.time())
        for r, (run_id, _) in hits:
            if run_id in listing.unreadable:
                journal.log(
                    "warning",
                    f"run {run_id}: enrich_try {listing.unreadable[run_id]!r} cannot be read; "
                    f"matched to row {r.row_ref}'s current attempt by its enrich_row",
                )
    return len(hits)
