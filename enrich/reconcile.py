"""Settle rows whose add-runs outcome is unknown, against the task group's run listing.

The API has no idempotency key, so a lost reply may or may not have created paid runs.
Every run carries `metadata = {enrich_job, enrich_row, enrich_try}`; the group's runs
stream echoes it. A row found there is adopted (no resubmit). A row is declared missing only
when its intent is older than the grace period (longer than the request timeout, so a
request still in flight cannot land after the decision) and two consecutive listings agree.
Rows whose creating POST is still in flight (`posting`) are not examined at all, and a release
names the attempt it examined, so a decision about an older attempt never moves a newer one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from enrich.client import TaskClient
from enrich.journal import Journal, Unresolved


@dataclass
class Outcome:
    adopted: int = 0
    missing: int = 0
    waiting: int = 0
    next_check: float | None = None  # wall time when waiting rows pass the grace period


async def list_refs(
    client: TaskClient, taskgroup_id: str, job_tag: str, since: str | None = None
) -> dict[tuple[str, int], tuple[str, str]]:
    """(enrich_row, enrich_try) -> (run_id, cursor before that run) for this job's runs in the group."""
    found: dict[tuple[str, int], tuple[str, str]] = {}
    prev = since or ""
    async for event in client.group_runs(taskgroup_id, last_event_id=since):
        if event.get("type") != "task_run.state":
            continue
        run = event.get("run") or {}
        meta = run.get("metadata") or {}
        if meta.get("enrich_job") == job_tag and isinstance(run.get("run_id"), str):
            try:
                key = (str(meta["enrich_row"]), int(meta["enrich_try"]))
            except (KeyError, TypeError, ValueError):
                key = None
            if key is not None:
                found.setdefault(key, (run["run_id"], prev))
        prev = str(event.get("event_id") or prev)
    return found


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
    """Adopt listed runs, release rows proven missing, and report rows still inside the grace period."""
    posting = posting if posting is not None else set()
    rows = [r for r in journal.unresolved() if r.row_key not in posting]
    out = Outcome()
    if not rows:
        return out
    now = time.time() if now is None else now
    found = await list_refs(client, taskgroup_id, job_tag)
    out.adopted = _adopt(journal, rows, found)
    candidates = [r for r in rows if (r.row_ref, r.attempt) not in found and now - r.intent_at >= grace_s]
    if candidates:
        again = await list_refs(client, taskgroup_id, job_tag)  # the second, confirming listing
        candidates = [r for r in candidates if r.row_key not in posting]
        out.adopted += _adopt(journal, candidates, again)
        missing = [(r.row_key, r.attempt) for r in candidates if (r.row_ref, r.attempt) not in again]
        if missing:
            # a lost request says nothing about the row: it does not count toward the row's retry limit
            journal.release(
                missing,
                time.time(),
                None,
                "the run was never created (confirmed by two listings)",
                max_retries,
                count_retry=False,
            )
        out.missing = len(missing)
    waiting = [r for r in rows if (r.row_ref, r.attempt) not in found and now - r.intent_at < grace_s]
    out.waiting = len(waiting)
    if waiting:
        out.next_check = min(r.intent_at for r in waiting) + grace_s
    return out


def _adopt(journal: Journal, rows: list[Unresolved], found: dict[tuple[str, int], tuple[str, str]]) -> int:
    hits = [(r.row_key, r.attempt, *found[(r.row_ref, r.attempt)]) for r in rows if (r.row_ref, r.attempt) in found]
    if hits:
        journal.adopt(hits, time.time())
    return len(hits)
