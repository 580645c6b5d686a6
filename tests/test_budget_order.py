"""Who gets the budget: every row's first-tier run before any escalation step, and a claim that does not fit
never blocks one that does (journal.claim, the one owner of the rule), in one process and in `enrich plan`."""

from __future__ import annotations

import asyncio
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich.client import TaskClient
from enrich.config import load_config
from enrich.errors import BudgetExceeded, DailyBudgetExceeded
from enrich.job import EXIT_BUDGET, run_job
from enrich.journal import Finished, Journal
from enrich.pipeline import execute, prepare
from enrich.progress import JobState
from tests.conftest import ROOT, run_enrich, write_config

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


# ---- end to end over loopback against the emulator ----------------------------------------------

ESCALATE = '[escalate]\nprocessors = ["core"]\non = ["rejected"]\n'


def ledger(emu: Any) -> list[dict[str, Any]]:
    return list(httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json())


def companies_job(tmp_path: Path, src: Path, budget: float) -> Path:
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company", "website"],
        fields={"headquarters_location": "string", "founded_year": "integer"},
        limits=f"budget_usd = {budget}",
    )
    cfg.write_text(cfg.read_text() + "\n" + ESCALATE)
    return cfg


def head(dest: Path, n: int) -> Path:
    """The first `n` rows of the bundled companies (the emulator's default knowledge table)."""
    lines = (ROOT / "data" / "companies.csv").read_text(encoding="utf-8").splitlines()
    dest.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return dest


def test_rows_added_later_are_researched_before_pending_escalations(tmp_path: Path, emulator) -> None:
    """Rows appended to the input are researched even though earlier rows wait for core steps the budget
    cannot pay; the run says how many rows and how many escalation steps the budget skipped, apart."""
    emu = emulator(hard_rate=0.5, seed=11)
    src = head(tmp_path / "in.csv", 40)
    first = run_job(load_config(companies_job(tmp_path, src, 0.25), {"api.base_url": emu.base_url}), api_key="k")
    assert first.exit_code == EXIT_BUDGET, first.message  # 40 lite runs ($0.20), then 2 core steps at most
    paid = sum(e["price_micros"] for e in ledger(emu))
    pending_steps = first.counts["pending"]
    assert pending_steps > 0 and first.report["status_counts"] == {"completed": 40}

    head(src, 43)  # three new rows at the end of the input
    cfg = companies_job(tmp_path, src, (paid + 3 * 5000) / 1e6)  # exactly three more lite runs
    plan = run_enrich("plan", str(cfg))
    assert "to submit            3  x lite-fast" in plan.stdout, plan.stdout
    assert f"escalation steps     {pending_steps} pending ({pending_steps} x core at $0.0250/run)" in plan.stdout, (
        plan.stdout
    )
    assert "room for 3 of" in plan.stdout, plan.stdout
    second = run_job(load_config(cfg, {"api.base_url": emu.base_url}), api_key="k")
    assert second.exit_code == EXIT_BUDGET, second.message
    new = ledger(emu)[len(ledger(emu)) - 3 :]
    assert Counter(e["processor"] for e in new) == {"lite-fast": 3}
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    assert Counter(out["_enrich_status"].to_list()) == {"completed": 43}
    assert "skipped_budget" not in second.message, second.message  # every row was researched
    after = run_enrich("plan", str(cfg)).stdout  # the new rows' climbs are counted too, as plan prices them
    steps = next(line for line in after.splitlines() if line.startswith("escalation steps")).split()[2]
    assert int(steps) >= pending_steps and f"{steps} escalation steps not run" in second.message, second.message


def test_skipped_rows_and_skipped_escalations_are_counted_apart(tmp_path: Path, emulator) -> None:
    """A budget that stops first-tier research reports exactly the rows marked skipped_budget in the output."""
    emu = emulator(hard_rate=0.5, seed=11)
    src = head(tmp_path / "in.csv", 30)
    res = run_job(load_config(companies_job(tmp_path, src, 0.1), {"api.base_url": emu.base_url}), api_key="k")
    assert res.exit_code == EXIT_BUDGET
    with (tmp_path / "out.csv").open(encoding="utf-8") as f:
        status = Counter(r["_enrich_status"] for r in csv.DictReader(f))
    assert status == {"completed": 20, "skipped_budget": 10}
    assert "10 rows not researched (skipped_budget)" in res.message, res.message
    plan = run_enrich("plan", str(tmp_path / "job.toml")).stdout  # finished rows that would climb, apart
    steps = next(line for line in plan.splitlines() if line.startswith("escalation steps")).split()[2]
    assert f"; {steps} escalation steps not run" in res.message, (res.message, plan)


def test_progress_never_counts_a_row_in_flight_as_finished(tmp_path: Path, emulator) -> None:
    """During escalation the progress count goes back for rows that climb: finished + in flight <= rows."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.002)
    cfg = load_config(companies_job(tmp_path, head(tmp_path / "in.csv", 50), 100.0), {"api.base_url": emu.base_url})
    journal = Journal.open(tmp_path / "j.sqlite")
    prep = prepare(cfg, journal)
    state = JobState()
    seen: list[tuple[int, int, int]] = []

    async def main() -> None:
        client = TaskClient(emu.base_url, "k", timeout_s=5)

        async def watch() -> None:
            while True:
                seen.append((state.finished_rows(), state.in_flight, state.escalated))
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        try:
            await execute(cfg, journal, client, prep, emulated=False, state=state)
        finally:
            watcher.cancel()
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        journal.close()
    assert state.escalated > 0 and any(n > 0 and e > 0 for _, n, e in seen)  # watched while steps ran
    assert all(f + n <= 50 for f, n, _ in seen), max(seen)
    assert state.finished_rows() == 50


def test_the_budget_stop_counts_the_climbs_plan_counts(tmp_path: Path, emulator) -> None:
    """With a two-rung ladder, the run's 'escalation steps not run' includes rows that finished a step and
    would climb the next one, the same count `enrich plan` prices right after."""
    emu = emulator(hard_rate=0.6, seed=3)
    src = head(tmp_path / "in.csv", 30)
    cfg = companies_job(tmp_path, src, 30 * 0.005 + 6 * 0.01)  # every lite run, then six base steps
    cfg.write_text(cfg.read_text().replace('processors = ["core"]', 'processors = ["base", "core"]'))
    result = run_job(load_config(cfg, {"api.base_url": emu.base_url}), api_key="k")
    assert result.exit_code == EXIT_BUDGET, result.message
    plan = run_enrich("plan", str(cfg))
    waiting = next(line for line in plan.stdout.splitlines() if line.startswith("escalation steps"))
    steps = int(waiting.split()[2].replace(",", ""))
    assert "x core" in waiting, plan.stdout  # some rows finished base and would climb to core
    assert f"{steps} escalation steps not run" in result.message, (result.message, plan.stdout)
