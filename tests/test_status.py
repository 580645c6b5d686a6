"""status.py: every run status the API can report is classified, and the table matches the spec."""

from __future__ import annotations

import json

import pytest

from enrich.status import STATUSES, classify_status, is_terminal
from tests.conftest import ROOT


def _spec() -> dict:
    for candidate in (ROOT.parent / "shared", ROOT.parent.parent / "shared"):  # main checkout or a scratch clone
        path = candidate / "specs" / "parallel-openapi.json"
        if path.exists():
            return json.loads(path.read_text())
    pytest.skip("shared/specs/parallel-openapi.json is absent: cannot check the status table against the spec")


def test_table_covers_exactly_the_spec_enum() -> None:
    """The table has one entry per TaskRun.status value of the OpenAPI spec, no more, no less."""
    enum = _spec()["components"]["schemas"]["TaskRun"]["properties"]["status"]["enum"]
    assert set(STATUSES) == set(enum)


def test_active_matches_the_documented_is_active() -> None:
    """`active` mirrors the API's is_active: true exactly for queued, running, cancelling."""
    assert {s for s, c in STATUSES.items() if c.active} == {"queued", "running", "cancelling"}


@pytest.mark.parametrize(
    "status,terminal,action,retriable",
    [
        ("queued", False, "wait", False),
        ("running", False, "wait", False),
        ("action_required", False, "wait", False),
        ("cancelling", False, "wait", False),
        ("completed", True, "store", False),
        ("failed", True, "fail", False),
        ("cancelled", True, "requeue", True),
        ("brand_new_status", False, "wait", False),
        (None, False, "wait", False),
    ],
)
def test_classification(status: str | None, terminal: bool, action: str, retriable: bool) -> None:
    """Each status maps to one poller action; unknown ones wait and are never resubmitted."""
    c = classify_status(status)
    assert (c.terminal, c.action, c.retriable) == (terminal, action, retriable)
    assert is_terminal(status) is terminal
    assert c.known is (status in STATUSES)


def test_terminal_iff_not_waiting() -> None:
    """A terminal status never waits, and only terminal statuses can be retried."""
    for c in STATUSES.values():
        assert c.terminal == (c.action != "wait")
        assert not c.retriable or c.terminal
