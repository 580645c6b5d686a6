"""The review page's hold on one job: read it as `enrich run` recorded it, record verdicts, write the output.

Every request opens the job with job.open_job, the way `review apply` and `export` open it: read-only
to show it (that works beside a live `enrich run`), and with the journal's lock to change it, only for
the moment a verdict is recorded or the output written. While another process holds the lock (a run,
`review apply`), a verdict is refused with JournalLocked and nothing is recorded: the page says so and
the reviewer presses the key again once the run has ended. Requests are served one at a time (a lock),
so verdicts sent from two tabs at once are both recorded, one after the other.

A verdict from the page is a review line like one of the review file's: its cells go through
review.check_verdicts and job.record_verdicts, the same validation and the same writer as
`enrich review apply`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enrich.config import digest
from enrich.job import Job, known_keys, live_run, open_job, record_verdicts, rewrite_output
from enrich.journal import Journal
from enrich.review import check_verdicts
from enrich.review_page.queue import Item, Line, Queue, build_queue, item, row_lines

PAGE = "review page"  # the source named in a refused verdict's InputError


@dataclass(frozen=True)
class Decision:
    """What the page sends for one line: the verdict and the line it was given on (value and run shown)."""

    row_key: str
    field: str
    verdict: str
    corrected_value: str = ""
    note: str = ""
    run_id: str = ""
    value: str | None = None


class QueueChanged(Exception):
    """A bulk accept was confirmed for a queue that has changed since (another tab, a run): nothing recorded."""


@dataclass
class View:
    """What a page shows: the job, its queue and the live run working on it (None when there is none)."""

    job: Job
    queue: Queue
    live: dict[str, Any] | None


class Session:
    """One job behind the review page; thread-safe (one request at a time)."""

    def __init__(
        self,
        target: str | Path,
        overrides: Mapping[str, Any] | None = None,
        flags: Mapping[str, str] | None = None,
        reviewer: str = "",
    ):
        self.target, self.overrides, self.flags = target, dict(overrides or {}), dict(flags or {})
        self.reviewer = reviewer
        self.recorded = 0  # verdicts recorded by this page
        self._lock = threading.Lock()
        self._queue: Queue | None = None
        with self._open(readonly=True) as (job, journal, notes):
            self.notes = notes
            self._queue = build_queue(job, journal)
            self.output = job.output

    @contextlib.contextmanager
    def _open(self, readonly: bool) -> Iterator[tuple[Job, Journal, list[str]]]:
        job, journal, notes = open_job(self.target, self.overrides, self.flags, readonly=readonly)
        try:
            yield job, journal, notes
        finally:
            journal.close()

    def _current(self, job: Job, journal: Journal) -> Queue:
        """The queue, projected again when anything in the journal changed since (a run, `review apply`)."""
        if self._queue is None or self._queue.state != journal.write_state():
            self._queue = build_queue(job, journal)
        return self._queue

    def view(self) -> View:
        with self._lock, self._open(readonly=True) as (job, journal, _):
            return View(job, self._current(job, journal), live_run(journal))

    def item(self, row_key: str, field: str) -> tuple[View, Item | None]:
        with self._lock, self._open(readonly=True) as (job, journal, _):
            return View(job, self._current(job, journal), live_run(journal)), item(job, journal, row_key, field)

    def decide(self, decisions: Sequence[Decision], reviewer: str) -> int:
        """Record verdicts (all or nothing); InputError names the first bad one, JournalLocked when a run holds
        the journal. Returns how many were recorded."""
        with self._lock, self._open(readonly=False) as (job, journal, _):
            return self._record(job, journal, decisions, reviewer)

    def accept_all(self, lines: Sequence[Line], state: str, reviewer: str) -> int:
        """Accept these lines (a filter of the queue whose state token was `state`, see `state_token`) as
        shown; QueueChanged when the queue is no longer the one the reviewer confirmed."""
        with self._lock, self._open(readonly=False) as (job, journal, _):
            if state != state_token(self._current(job, journal)):
                raise QueueChanged()
            decisions = [Decision(ln.row_key, ln.field, "accept", run_id=ln.run_id, value=ln.value) for ln in lines]
            return self._record(job, journal, decisions, reviewer)

    def _record(self, job: Job, journal: Journal, decisions: Sequence[Decision], reviewer: str) -> int:
        before = journal.write_state()
        keys = known_keys(journal)
        names = list(job.cfg.input.key)
        cells = []
        for i, d in enumerate(decisions, start=1):
            cell = dict(zip(names, _key_cells(d.row_key, len(names)), strict=True))
            cell.update(
                field=d.field,
                verdict=d.verdict,
                corrected_value=d.corrected_value,
                reviewer=reviewer,
                note=d.note,
                run_id=d.run_id,
            )
            if d.value is not None:
                cell["value"] = d.value
            cells.append((i, cell))
        verdicts = check_verdicts(PAGE, cells, names, job.fields, keys)
        n = record_verdicts(job, journal, verdicts, PAGE, keys)
        touched = sorted({keys[v.key] for v in verdicts})
        if self._queue is not None and self._queue.state == before:  # nothing else changed: refresh these rows
            self._queue.replace_rows(touched, row_lines(job, journal, touched), journal.write_state())
        else:
            self._queue = build_queue(job, journal)
        self.recorded += n
        return n

    def write(self) -> dict[str, Any]:
        """Rewrite the job's output, review file and reports from the journal (as `review apply` does)."""
        with self._lock, self._open(readonly=False) as (job, journal, _):
            safe = f"the verdicts are recorded in {job.journal_path}"
            return rewrite_output(job, journal, {"review_page_verdicts": self.recorded}, safe)


def state_token(queue: Queue) -> str:
    """A short token for the journal state a queue was projected from (a confirmation names it)."""
    return digest(["review-queue", queue.state], 16)


def _key_cells(row_key: str, n: int) -> list[str]:
    """The key values of a journal row key as a review line's key cells (text); blanks when it is malformed, so
    check_verdicts refuses it as an unknown key."""
    try:
        values = json.loads(row_key)
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != n:
        return [""] * n
    return [str(v) for v in values]
