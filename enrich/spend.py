"""Pure part of the daily budget (`limits.daily_budget_usd`): UTC days and "can we reserve n runs today?".

The ledger itself (`limits.spend_ledger`, shared by every job using it) stores integer
micro-dollars per UTC day; this module decides from `spent_today` alone, with the clock
injected, so the rule is testable without a file or the wall clock. A day starts at 00:00
UTC for everyone, whatever the machine's time zone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from enrich.errors import BudgetExceeded


def money(micros: int) -> str:
    """Exact dollars for messages (unit prices have fractions of a cent).

    >>> money(25_000), money(10_000_000), money(75_000)
    ('$0.025', '$10.00', '$0.075')
    """
    whole, frac = divmod(abs(micros), 1_000_000)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{'-' if micros < 0 else ''}${whole:,}.{digits}"


def _as_utc(ts: float | datetime) -> datetime:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError("a naive datetime is ambiguous; pass an aware one or epoch seconds")
        return ts.astimezone(UTC)
    return datetime.fromtimestamp(ts, UTC)


def utc_day(ts: float | datetime) -> str:
    """The UTC calendar day of a time, as the ledger's key.

    >>> utc_day(0), utc_day(86_399.9), utc_day(86_400)
    ('1970-01-01', '1970-01-01', '1970-01-02')
    """
    return _as_utc(ts).date().isoformat()


def next_reset(ts: float | datetime) -> datetime:
    """The next UTC midnight after `ts` (a time exactly at midnight resets 24 h later).

    >>> next_reset(3600).isoformat()
    '1970-01-02T00:00:00+00:00'
    """
    moment = _as_utc(ts)
    return datetime.combine(moment.date() + timedelta(days=1), datetime.min.time(), UTC)


def iso_z(moment: datetime) -> str:
    """`2025-05-02T00:00:00Z` (RFC 3339, UTC, no fraction)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def runs_that_fit(unit_micros: int, spent_micros: int, budget_micros: int) -> int:
    """How many runs at `unit_micros` still fit: spent + k * unit <= budget.

    >>> runs_that_fit(25_000, 9_950_000, 10_000_000), runs_that_fit(25_000, 10_100_000, 10_000_000)
    (2, 0)
    """
    if unit_micros <= 0:
        raise ValueError("a run's price must be positive")
    return max(0, (budget_micros - spent_micros) // unit_micros)


@dataclass(frozen=True)
class DailyCheck:
    """The answer to "may n more runs be reserved today?" (`allowed` may be fewer than `requested`)."""

    requested: int
    allowed: int
    day: str
    spent_micros: int
    budget_micros: int
    unit_micros: int
    resets_at: datetime
    now: datetime

    @property
    def ok(self) -> bool:
        return self.allowed >= self.requested

    @property
    def message(self) -> str:
        """One line for people: what was spent, what would be needed, when the day resets."""
        left = self.resets_at - self.now
        hours, rest = divmod(int(left.total_seconds()), 3600)
        return (
            f"daily budget {money(self.budget_micros)} (limits.daily_budget_usd) for UTC day {self.day}: "
            f"{money(self.spent_micros)} spent; {self.requested} more run(s) at {money(self.unit_micros)} "
            f"need {money(self.requested * self.unit_micros)}, {self.allowed} fit; "
            f"resets at {iso_z(self.resets_at)} (in {hours}h {rest // 60:02d}m)"
        )


def check_daily(
    n: int, unit_micros: int, spent_today_micros: int, daily_budget_micros: int, now: float | datetime
) -> DailyCheck:
    """Whether `n` runs at `unit_micros` fit in today's remaining daily budget.

    `spent_today_micros` is the ledger's total for `utc_day(now)` (reserved runs included).

    >>> c = check_daily(3, 25_000, 9_950_000, 10_000_000, 0)
    >>> c.ok, c.allowed, iso_z(c.resets_at)
    (False, 2, '1970-01-02T00:00:00Z')
    """
    if n < 0:
        raise ValueError("cannot reserve a negative number of runs")
    moment = _as_utc(now)
    allowed = min(n, runs_that_fit(unit_micros, spent_today_micros, daily_budget_micros))
    return DailyCheck(
        requested=n,
        allowed=allowed,
        day=utc_day(moment),
        spent_micros=spent_today_micros,
        budget_micros=daily_budget_micros,
        unit_micros=unit_micros,
        resets_at=next_reset(moment),
        now=moment,
    )


def reserve_today(
    n: int,
    unit_micros: int,
    spent_today_micros: int,
    daily_budget_micros: int,
    now: float | datetime,
    *,
    partial: bool = False,
) -> int:
    """How many of `n` runs to reserve now; raises BudgetExceeded (with the reset time) when none may be.

    Without `partial` it is all or nothing; with it, as many as fit (at least one, or the error).
    """
    check = check_daily(n, unit_micros, spent_today_micros, daily_budget_micros, now)
    if check.ok or (partial and check.allowed > 0):
        return check.allowed
    raise BudgetExceeded(check.message)


def daily_message(spent_today_micros: int, daily_budget_micros: int, now: float | datetime) -> str:
    """The one-line refusal when today's daily budget is spent, saying when it resets."""
    reset = next_reset(now)
    return (
        f"daily budget reached: {money(spent_today_micros)} of {money(daily_budget_micros)} spent or reserved "
        f"today (UTC); it resets at {iso_z(reset)}"
    )
