"""Pure: what the poller does with each run status the Task API can report.

The spec's enum (TaskRun.status) is `queued, action_required, running, completed, failed,
cancelling, cancelled`; a test pins this table to it. The API's own `is_active` is true
exactly for queued, running and cancelling.

    status           terminal  active  action    retriable   why
    queued           no        yes     wait      no          will run
    running          no        yes     wait      no          will finish
    action_required  no        no      wait      no          needs an action enrich cannot take
                                                             (no endpoint for it); the row deadline
                                                             (limits.row_timeout_s) ends the wait
    cancelling       no        yes     wait      no          becomes cancelled
    completed        yes       no      store     no          fetch and keep the result
    failed           yes       no      fail      no          the API judged this input; paying
                                                             again automatically is not our call
    cancelled        yes       no      requeue   yes         enrich never cancels (there is no
                                                             cancel endpoint), so the stop came from
                                                             outside and says nothing about the row;
                                                             resubmit within limits.max_attempts
    (unknown)        no        -       wait      no          a newer API status: never resubmit what
                                                             may still run and bill

"retriable" means: submitting a fresh (paid) run for the row may succeed and is done
automatically. Polling again is always safe and is what "wait" means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["wait", "store", "fail", "requeue"]


@dataclass(frozen=True)
class StatusClass:
    """How one status is handled: `terminal` (will not change by itself), `active` (the
    API's is_active), `action` for the poller, `retriable` (a new run may be submitted)."""

    status: str
    terminal: bool
    active: bool | None
    action: Action
    retriable: bool
    known: bool = True


STATUSES: dict[str, StatusClass] = {
    s.status: s
    for s in (
        StatusClass("queued", terminal=False, active=True, action="wait", retriable=False),
        StatusClass("running", terminal=False, active=True, action="wait", retriable=False),
        StatusClass("action_required", terminal=False, active=False, action="wait", retriable=False),
        StatusClass("cancelling", terminal=False, active=True, action="wait", retriable=False),
        StatusClass("completed", terminal=True, active=False, action="store", retriable=False),
        StatusClass("failed", terminal=True, active=False, action="fail", retriable=False),
        StatusClass("cancelled", terminal=True, active=False, action="requeue", retriable=True),
    )
}


def classify_status(status: str | None) -> StatusClass:
    """The table entry for `status`; an unknown or missing status waits (never resubmitted).

    >>> classify_status("cancelled").action, classify_status("action_required").terminal
    ('requeue', False)
    >>> classify_status("paused").known
    False
    """
    if isinstance(status, str) and status in STATUSES:
        return STATUSES[status]
    return StatusClass(str(status), terminal=False, active=None, action="wait", retriable=False, known=False)


def is_terminal(status: str | None) -> bool:
    """True when the run will not change status by itself (completed, failed, cancelled)."""
    return classify_status(status).terminal
