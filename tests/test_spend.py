"""spend.py: UTC days, the next reset, and whether n runs fit in today's budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrich.errors import BudgetExceeded
from enrich.spend import check_daily, next_reset, reserve_today, runs_that_fit, utc_day

CORE = 25_000  # micro-USD per core run


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


def test_check_daily_message() -> None:
    """The message says what was spent, what is needed and when the day resets."""
    now = datetime(2025, 5, 1, 20, 30, tzinfo=UTC)
    c = check_daily(3, CORE, 9_950_000, 10_000_000, now)
    assert (c.ok, c.allowed, c.day) == (False, 2, "2025-05-01")
    assert c.message == (
        "daily budget $10.00 (limits.daily_budget_usd) for UTC day 2025-05-01: $9.95 spent; "
        "3 more run(s) at $0.025 need $0.075, 2 fit; resets at 2025-05-02T00:00:00Z (in 3h 30m)"
    )


def test_reserve_today() -> None:
    """All or nothing by default; partial reserves what fits; nothing fitting always raises."""
    now = datetime(2025, 5, 1, 12, tzinfo=UTC)
    assert reserve_today(4, CORE, 0, 100_000, now) == 4
    with pytest.raises(BudgetExceeded, match="resets at 2025-05-02T00:00:00Z"):
        reserve_today(5, CORE, 0, 100_000, now)
    assert reserve_today(5, CORE, 0, 100_000, now, partial=True) == 4
    with pytest.raises(BudgetExceeded):
        reserve_today(1, CORE, 100_000, 100_000, now, partial=True)
    assert reserve_today(0, CORE, 10**9, 0, now) == 0
