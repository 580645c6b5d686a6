"""How a job ended is decided in one place (job.stop_reason): the exit code, the why and the error agree."""

from __future__ import annotations

from typing import Any

import pytest

from enrich.errors import (
    EXIT_AUTH,
    EXIT_BUDGET,
    EXIT_CODES,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ApiUnavailable,
    AuthError,
    JournalError,
)
from enrich.job import stop_reason
from enrich.progress import JobState

KEY = "sk-a-long-secret-key-0123456789"


def state(**kw: Any) -> JobState:
    s = JobState()
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@pytest.mark.parametrize(
    ("kw", "interrupted", "counts", "kind", "code"),
    [
        ({}, False, {"done": 3}, "done", EXIT_OK),
        ({}, False, {"done": 2, "failed": 1}, "failed_rows", EXIT_FAILED_ROWS),
        ({}, False, {"done": 2, "action_required": 1}, "failed_rows", EXIT_FAILED_ROWS),  # waits for an action
        ({"budget_exhausted": True}, False, {"done": 1, "pending": 2}, "budget", EXIT_BUDGET),
        ({"budget_exhausted": True}, False, {"done": 3}, "done", EXIT_OK),  # the budget ran out after the last row
        ({"unreachable": "nothing listens"}, False, {"pending": 3}, "unavailable", EXIT_UNAVAILABLE),
        ({"unreachable": "nothing listens"}, True, {"pending": 3}, "interrupted", EXIT_INTERRUPTED),
        ({"fatal": AuthError("401 bad key")}, True, {"pending": 3}, "auth", EXIT_AUTH),
        ({"fatal": JournalError("journal moved")}, False, {"pending": 3}, "fatal", EXIT_USAGE),
        ({"fatal": ZeroDivisionError("division by zero")}, False, {"done": 3}, "crashed", EXIT_SOFTWARE),
    ],
)
def test_one_end_state(kw: dict[str, Any], interrupted: bool, counts: dict[str, int], kind: str, code: int) -> None:
    """Each end state has one kind and one documented exit code; a crash in a stage is not 'failed rows'."""
    stop = stop_reason(state(**kw), interrupted, counts, KEY)
    assert (stop.kind, stop.exit_code) == (kind, code)
    assert stop.exit_code in EXIT_CODES
    if kind in ("auth", "fatal", "crashed", "unavailable"):
        assert stop.error is not None and stop.why
    if kind == "unavailable":
        assert isinstance(stop.error, ApiUnavailable)


def test_the_why_never_holds_the_key() -> None:
    """A fatal error whose text holds the key is redacted in the one line that says why."""
    stop = stop_reason(state(fatal=AuthError(f"401 for {KEY}")), False, {}, KEY)
    assert KEY not in (stop.why or "")
