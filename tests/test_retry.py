"""retry.py: classification is total and conservative; backoff; the circuit breaker."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrich.errors import (
    ApiError,
    AuthError,
    OutcomeUnknown,
    PaymentRequired,
    PermanentApiError,
    TransientApiError,
)
from enrich.retry import CircuitBreaker, backoff, classify_failure, classify_status, parse_retry_after

CLASSES = {TransientApiError, PermanentApiError, OutcomeUnknown, AuthError, PaymentRequired}


@given(st.integers(100, 599), st.booleans())
def test_status_classes_keep_the_money_rules(status: int, creating: bool) -> None:
    """Properties from reliability.md 4: a GET is never 'outcome unknown'; a create that may have reached
    the server (5xx) is never 'safe to retry'; 401/403 end the run; 402 pauses it; other 4xx are final."""
    cls = classify_status(status, creating)
    assert cls in CLASSES
    if not creating:
        assert cls is not OutcomeUnknown
    if creating and status >= 500:
        assert cls is OutcomeUnknown
    if status in (401, 403):
        assert cls is AuthError
    if status == 402:
        assert cls is PaymentRequired
    if 400 <= status < 500 and status not in (401, 402, 403, 408, 409, 429):
        assert cls is PermanentApiError


@pytest.mark.parametrize(
    "status,creating,cls",
    [
        (401, True, AuthError),
        (403, False, AuthError),
        (402, True, PaymentRequired),
        (422, True, PermanentApiError),
        (404, False, PermanentApiError),
        (301, True, PermanentApiError),
        (429, True, TransientApiError),
        (408, True, TransientApiError),
        (500, True, OutcomeUnknown),
        (502, True, OutcomeUnknown),
        (503, True, OutcomeUnknown),
        (500, False, TransientApiError),
        (504, False, TransientApiError),
    ],
)
def test_status_table(status: int, creating: bool, cls: type[ApiError]) -> None:
    """A create that may have reached the server is never 'safe to retry'."""
    assert classify_status(status, creating) is cls


@pytest.mark.parametrize(
    "kind,creating,cls",
    [
        ("connect", True, TransientApiError),
        ("connect_timeout", True, TransientApiError),
        ("pool_timeout", True, TransientApiError),
        ("write", True, OutcomeUnknown),
        ("read", True, OutcomeUnknown),
        ("read_timeout", True, OutcomeUnknown),
        ("protocol", True, OutcomeUnknown),
        ("protocol", False, TransientApiError),
    ],
)
def test_failure_table(kind: str, creating: bool, cls: type[ApiError]) -> None:
    assert classify_failure(kind, creating) is cls


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert parse_retry_after({"retry-after": "9999"}) == 120.0
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None


@given(st.integers(1, 50), st.floats(0, 0.999), st.one_of(st.none(), st.floats(0, 120)))
def test_backoff_bounds(attempt: int, rand: float, retry_after: float | None) -> None:
    """Full jitter within [0, cap]; a Retry-After is a floor."""
    d = backoff(attempt, rand, retry_after)
    assert 0 <= d <= max(30.0, retry_after or 0)
    if retry_after is not None:
        assert d >= retry_after


def test_breaker_opens_probes_once_and_recovers() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=3, cooldown=2.0, clock=lambda: now[0])
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 2.0
    assert b.allow() and not b.allow()  # exactly one probe per cooldown
    b.failure()  # failed probe: open again, longer cooldown
    now[0] = 5.0
    assert not b.allow()
    now[0] = 6.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.probes == 2


def test_breaker_trip_forever() -> None:
    b = CircuitBreaker()
    b.trip_forever()
    b.success()
    assert not b.allow() and b.state == "dead"
