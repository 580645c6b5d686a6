"""Who gets the budget: every row's first-tier run before any escalation step, and a claim that does not fit
never blocks one that does (journal.claim, the one owner of the rule), in one process and in `enrich plan`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enrich.errors import BudgetExceeded, DailyBudgetExceeded
from enrich.journal import Finished, Journal

PRICES = {"lite": 5000, "base": 10000, "core": 25000}
DAY = 1_746_144_000.0  # 2025-05-02T00:00:00Z


def seed(j: Journal, keys: list[str], epoch: int = 1, proc: str = "lite") -> None:
    j.seed(
        [
            [
                (json.dumps([k]), f"ref{k}", i, i + 2, json.dumps([k]), json.dumps({"c": k}), k, "s", proc)
                for i, k in enumerate(keys)
            ]
        ],
        epoch,
        None,
        False,
    )


def research(j: Journal, epoch: int) -> None:
    """Every pending row gets its first-tier run and a result."""
    got = j.claim(epoch, 100, PRICES, None, DAY, 1)
    j.mark_submitted([(c.row_key, c.attempt) for c in got], [f"t{c.row_ref}" for c in got], 1, "", DAY)
    j.record([Finished(f"t{c.row_ref}", c.row_ref, c.attempt, result_json="{}") for c in got], DAY)


@pytest.fixture
def j(tmp_path: Path) -> Any:
    journal = Journal.open(tmp_path / "j.sqlite")
    seed(journal, ["a", "b"])
    research(journal, 1)
    seed(journal, ["a", "b", "c", "d"], epoch=2)  # c, d: new rows, not researched yet (a, b: reused)
    done = [r[0] for r in journal.conn.execute("SELECT id FROM rows WHERE state='done' ORDER BY ordinal")]
    journal.climb([(i, "core") for i in done], DAY)  # a, b (first in input order) wait for a core step
    yield journal
    journal.close()


def keys(claimed: list[Any]) -> list[str]:
    return [json.loads(c.row_key)[0] for c in claimed]


def test_first_tier_rows_are_claimed_before_escalation_steps(j: Journal) -> None:
    """With no budget at all, rows later in the input still get their first-tier run before earlier rows climb."""
    assert j.counts(2) == {"pending": 4}
    first = j.claim(2, 10, PRICES, None, DAY, 2)
    assert keys(first) == ["c", "d"] and {c.processor for c in first} == {"lite"}
    second = j.claim(2, 10, PRICES, None, DAY, 3)
    assert keys(second) == ["a", "b"] and {c.processor for c in second} == {"core"}


def test_a_step_that_does_not_fit_never_blocks_a_cheaper_row(j: Journal) -> None:
    """Head-of-line: a core step first in input order does not fit; the lite rows that fit are still claimed."""
    spent = j.spent_micros()
    budget = spent + 2 * PRICES["lite"] + 1  # two lite runs fit, a core step does not
    assert keys(j.claim(2, 10, PRICES, budget, DAY, 2)) == ["c", "d"]
    with pytest.raises(BudgetExceeded, match="budget reached"):  # the cheapest left (core) does not fit: stop
        j.claim(2, 10, PRICES, budget, DAY, 3)
    assert j.counts(2) == {"intent": 2, "pending": 2} and j.spent_micros() == spent + 2 * PRICES["lite"]


def test_the_daily_budget_follows_the_same_rule(j: Journal) -> None:
    """A core step over today's daily budget leaves room for lite rows; the refusal says when the day resets."""
    j.attach_ledger(None, "job")  # spend per UTC day, in this journal
    assert keys(j.claim(2, 10, PRICES, None, DAY, 2, daily_budget=3 * PRICES["lite"])) == ["c", "d"]
    with pytest.raises(DailyBudgetExceeded, match="resets at 2025-05-03T00:00:00Z"):
        j.claim(2, 10, PRICES, None, DAY, 3, daily_budget=3 * PRICES["lite"])
    assert keys(j.claim(2, 10, PRICES, None, DAY + 86_400, 4, daily_budget=PRICES["core"] * 2)) == ["a", "b"]


def test_cheaper_rows_in_backoff_keep_their_money(j: Journal) -> None:
    """Lite rows waiting out a 429 backoff are not outbid by ready core steps; they are claimed when ready."""
    got = j.claim(2, 10, PRICES, None, DAY, 2)
    j.release([(c.row_key, c.attempt) for c in got], DAY, DAY + 30, "429", 6)  # c, d: back, not before +30 s
    budget = j.spent_micros() + 2 * PRICES["lite"] + PRICES["core"] - 1  # not enough for both lite and a core
    assert j.claim(2, 10, PRICES, budget, DAY, 3) == []  # nothing now (not an error: the lite rows fit)
    assert keys(j.claim(2, 10, PRICES, budget, DAY + 31, 4)) == ["c", "d"]
    with pytest.raises(BudgetExceeded):
        j.claim(2, 10, PRICES, budget, DAY + 31, 5)
