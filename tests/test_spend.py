"""spend.py: UTC days, the next reset, how many runs fit (the claim's rule itself: tests/test_budget_order.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrich.spend import next_reset, runs_that_fit, utc_day


@pytest.mark.parametrize(
    "ts,day",
    [
        (datetime(2025, 5, 1, 23, 59, 59, 999999, UTC), "2025-05-01"),
        (datetime(2025, 5, 2, 0, 0, tzinfo=UTC), "2025-05-02"),
        (datetime(2025, 5, 1, 20, 0, tzinfo=timezone(timedelta(hours=-5))), "2025-05-02"),  # 01:00 UTC
        (1_746_144_000.0, "2025-05-02"),
    ],
)
def test_utc_day(ts: float | datetime, day: str) -> None:
    """Days are UTC calendar days whatever the zone of the given time."""
    assert utc_day(ts) == day


def test_naive_datetime_is_refused() -> None:
    """A naive datetime could be any zone: refused rather than guessed."""
    with pytest.raises(ValueError, match="naive"):
        utc_day(datetime(2025, 5, 1))


@given(st.floats(0, 4e9))
def test_next_reset_is_the_following_midnight(ts: float) -> None:
    """The reset is a UTC midnight, after ts, at most 24 h away, and on the next day."""
    reset = next_reset(ts)
    moment = datetime.fromtimestamp(ts, UTC)
    assert (reset.hour, reset.minute, reset.second, reset.microsecond) == (0, 0, 0, 0)
    assert timedelta(0) < reset - moment <= timedelta(days=1)
    assert utc_day(reset) != utc_day(moment)


@given(st.integers(1, 10**7), st.integers(0, 10**9), st.integers(0, 10**9))
def test_runs_that_fit_is_the_largest_k(unit: int, spent: int, budget: int) -> None:
    """k runs fit and k+1 would not (or nothing fits when already over)."""
    k = runs_that_fit(unit, spent, budget)
    assert k >= 0 and (k == 0 or spent + k * unit <= budget) and spent + (k + 1) * unit > budget
