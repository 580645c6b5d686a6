"""Budget arithmetic for `Journal.claim`, the one place a run is reserved: UTC days and "how many runs fit".

The claim (journal.py) owns the rule: it reserves in the same transaction as the intent, against the
job's budget (`limits.budget_usd`) and today's daily budget (`limits.daily_budget_usd`, counted per
UTC day in the spend ledger `limits.spend_ledger` that jobs may share), cheapest processor first.
This module holds the pure pieces it uses: the ledger's day key, the fit, and the refusal message.
A day starts at 00:00 UTC for everyone, whatever the machine's time zone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


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


def daily_message(spent_today_micros: int, daily_budget_micros: int, now: float | datetime) -> str:
    """The one-line refusal when today's daily budget is spent, saying when it resets."""
    reset = next_reset(now)
    return (
        f"daily budget reached: {money(spent_today_micros)} of {money(daily_budget_micros)} spent or reserved "
        f"today (UTC); it resets at {iso_z(reset)}"
    )


def runs_within(left_micros: int | None, runs: dict[int, int]) -> int | None:
    """How many of the runs (price -> count) fit in `left_micros` when the cheapest go first, as the claim
    takes them (None: no budget). What `enrich plan` promises is what `enrich run` then does.

    >>> runs_within(30_000, {5_000: 3, 25_000: 2}), runs_within(10_000, {25_000: 1}), runs_within(None, {1: 1})
    (3, 0, None)
    """
    if left_micros is None:
        return None
    fit = 0
    for price in sorted(runs):
        k = min(runs[price], runs_that_fit(price, 0, max(left_micros, 0)))
        fit += k
        left_micros -= k * price
        if k < runs[price]:
            break
    return fit
