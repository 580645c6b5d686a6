"""From evidence to decisions, end to end over loopback HTTP: gate, escalation, review, reuse, daily budget."""

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
from enrich.job import EXIT_BUDGET, EXIT_OK, open_job, run_job
from enrich.journal import DailyBudgetExceeded, Journal
from enrich.pipeline import execute, prepare
from enrich.progress import JobState
from enrich.review_page.queue import build_queue, row_lines
from tests.conftest import ROOT, run_enrich, write_config

FIELDS = {"headquarters_location": "string", "founded_year": "integer"}  # the bundled companies table
SP_FIELDS = {"headquarters_location": "string", "founded": "string"}  # S&P 500 columns
ESCALATE = '[escalate]\nprocessors = ["base", "core"]\non = ["rejected"]\n'


def ledger(emu: Any) -> list[dict[str, Any]]:
    return httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json()


def per_row_processor(entries: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((e["metadata"]["enrich_row"], e["processor"]) for e in entries)


def job(
    tmp_path: Path,
    src: Path,
    *,
    extra: str = "",
    processor: str = "lite-fast",
    limits: str = "",
    out: str = "out.parquet",
    name: str = "job.toml",
) -> Path:
    cfg = write_config(
        tmp_path / name,
        input_path=src,
        output=tmp_path / out,
        key=["Symbol"] if "sp500" in str(src) else ["company"],
        columns=["Security"] if "sp500" in str(src) else ["company", "website"],
        fields=SP_FIELDS if "sp500" in str(src) else FIELDS,
        processor=processor,
        limits=limits,
    )
    cfg.write_text(cfg.read_text() + "\n" + extra)
    return cfg


def go(cfg: Path, base_url: str, **kw: Any) -> Any:
    return run_job(
        load_config(cfg, {"api.base_url": base_url}), api_key="sk-test-key-1234", install_signals=False, **kw
    )


@pytest.fixture
def sp_emulator(emulator, sp500: Path) -> Any:
    return emulator(knowledge=str(sp500), knowledge_key="Security", hard_rate=0.3, seed=7)


def test_escalation_on_sp500(tmp_path: Path, sp500: Path, sp_emulator: Any) -> None:
    """lite-fast then base, core: accepted rows run once, others at most once per processor, more accepted."""
    lite = go(job(tmp_path, sp500, out="lite.parquet", name="lite.toml"), sp_emulator.base_url)
    lite_df = pl.read_parquet(tmp_path / "lite.parquet")
    lite_runs = len(ledger(sp_emulator))
    assert lite.exit_code == EXIT_OK and lite_runs == 503

    budget = "budget_usd = 60"
    cfg = job(tmp_path, sp500, extra=ESCALATE, limits=budget)
    result = go(cfg, sp_emulator.base_url)
    assert result.exit_code == EXIT_OK, result.message
    entries = ledger(sp_emulator)[lite_runs:]
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df["Symbol"].to_list() == lite_df["Symbol"].to_list()  # every row once, in order
    by_row = per_row_processor(entries)
    assert max(by_row.values()) == 1  # at most one run per (row, processor)
    decisions = [f"{f}__decision" for f in SP_FIELDS]
    all_accepted_on_lite = lite_df.filter(pl.all_horizontal(pl.col(c) == "accepted" for c in decisions))
    refs = {e["input"]["Security"]: e["metadata"]["enrich_row"] for e in entries}
    runs_of = Counter(e["input"]["Security"] for e in entries)
    for sec in all_accepted_on_lite["Security"].to_list():
        assert runs_of[sec] == 1, sec  # exactly one run: lite
    assert len(refs) == 503 and sum(runs_of.values()) > 503
    assert set(df["headquarters_location__processor"].unique().to_list()) >= {"lite-fast", "base"}

    def accepted_share(frame: pl.DataFrame) -> float:
        return sum((frame[c] == "accepted").sum() for c in decisions) / (len(frame) * len(decisions))

    assert accepted_share(df) > accepted_share(lite_df)
    spend = sum(e["price_micros"] for e in entries)
    assert result.report["spend_usd"] == pytest.approx(spend / 1e6) and spend <= 60_000_000

    again = go(cfg, sp_emulator.base_url)  # a second run pays for nothing
    assert again.exit_code == EXIT_OK and len(ledger(sp_emulator)) == lite_runs + len(entries)


def test_escalation_on_review_alone_climbs_exactly_the_rows_with_a_field_in_review(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """`on = ["review"]`: a row climbs from base to core when a field is in review on base, never for a rejected
    one alone; a climbed row's review fields take core's better answer. The emulator grades a (row, processor) the
    same in every run, so a base-only run beforehand says which rows must climb."""
    alone = go(job(tmp_path, sp500, processor="base", out="base.parquet", name="base.toml"), sp_emulator.base_url)
    assert alone.exit_code == EXIT_OK
    base_df = pl.read_parquet(tmp_path / "base.parquet")
    decisions = [f"{f}__decision" for f in SP_FIELDS]
    review_rows = set(base_df.filter(pl.any_horizontal(pl.col(c) == "review" for c in decisions))["Security"])
    rejected_only = set(
        base_df.filter(
            pl.any_horizontal(pl.col(c) == "rejected" for c in decisions)
            & ~pl.any_horizontal(pl.col(c) == "review" for c in decisions)
        )["Security"]
    )
    assert review_rows and rejected_only  # the seed gives both kinds
    before = len(ledger(sp_emulator))
    extra = '[escalate]\nprocessors = ["core"]\non = ["review"]\n'
    cfg = job(tmp_path, sp500, extra=extra, processor="base", limits="budget_usd = 30")
    result = go(cfg, sp_emulator.base_url)
    assert result.exit_code == EXIT_OK, result.message
    entries = ledger(sp_emulator)[before:]
    climbed = {e["input"]["Security"] for e in entries if e["processor"] == "core"}
    assert climbed == review_rows
    assert Counter(e["processor"] for e in entries) == {"base": 503, "core": len(review_rows)}
    df = pl.read_parquet(tmp_path / "out.parquet")
    for c in decisions:
        kept = df.filter(pl.col("Security").is_in(sorted(rejected_only)))[c].to_list()
        assert kept == base_df.filter(pl.col("Security").is_in(sorted(rejected_only)))[c].to_list()
    gained = df.filter(pl.col("Security").is_in(sorted(review_rows)))
    assert sum((gained[c] == "accepted").sum() for c in decisions) > sum(
        (base_df.filter(pl.col("Security").is_in(sorted(review_rows)))[c] == "accepted").sum() for c in decisions
    )


def review_lines(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_review(lines: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows(lines)
    return path


def stopped_before_core(
    tmp_path: Path, src: Path, emu: Any, budget: float, pick: Any
) -> tuple[Path, list[dict[str, str]], list[dict[str, str]]]:
    """base>core on review, a budget that pays base for every distinct input and no core run ($0.025): the rows with
    a field in review wait for core. A reviewer then accepts the lines in review of the rows `pick(symbol)` chooses.
    Returns (config, lines in review, lines accepted)."""
    extra = '[escalate]\nprocessors = ["core"]\non = ["review"]\n'
    cfg = job(tmp_path, src, extra=extra, processor="base", limits=f"budget_usd = {budget}", out="out.csv")
    assert go(cfg, emu.base_url).exit_code == EXIT_BUDGET
    assert {e["processor"] for e in ledger(emu)} == {"base"}
    in_review = [r for r in review_lines(tmp_path / "out.review.csv") if r["confidence"] == "medium"]
    accepted = [dict(r, verdict="accept", reviewer="ana") for r in in_review if pick(r["Symbol"])]
    assert accepted and len(accepted) < len(in_review)
    r = run_enrich("review", "apply", str(cfg), str(write_review(accepted, tmp_path / "reviewed.csv")))
    assert r.returncode == 0, r.stderr
    return cfg, in_review, accepted


def assert_kept(out_csv: Path, accepted: list[dict[str, str]]) -> None:
    out = pl.read_csv(out_csv, infer_schema=False)
    for line in accepted:
        row = out.filter(pl.col("Symbol") == line["Symbol"]).row(0, named=True)
        assert (row[f"{line['field']}__decision"], row[line["field"]]) == ("human_accepted", line["value"]), line


def test_a_step_the_budget_left_waiting_is_not_paid_once_a_reviewer_decided_its_field(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """`on = ["review"]`, the budget stops the job with rows climbed to core but not sent; a reviewer accepts the
    review fields of about half of them; the next run pays core only for the others, and the accepted fields stay
    human_accepted with the value reviewed (found by the adversarial trial: all were paid)."""
    cfg, in_review, accepted = stopped_before_core(tmp_path, sp500, sp_emulator, 5.04, lambda sym: sym < "M")
    sec = dict(pl.read_csv(sp500, infer_schema=False).select("Symbol", "Security").iter_rows())
    again = run_job(
        load_config(cfg, {"api.base_url": sp_emulator.base_url, "limits.budget_usd": 30}),
        api_key="sk-test-key-1234",
        install_signals=False,
    )
    assert again.exit_code == EXIT_OK, again.message
    climbed = {e["input"]["Security"] for e in ledger(sp_emulator) if e["processor"] == "core"}
    assert climbed == {sec[r["Symbol"]] for r in in_review if r["Symbol"] >= "M"}
    assert_kept(tmp_path / "out.csv", accepted)


def test_a_verdict_on_a_row_waiting_for_its_step_shows_at_once(tmp_path: Path, sp500: Path, sp_emulator: Any) -> None:
    """Verdicts applied while the rows wait for core (the budget stopped the job): the rewritten output shows them
    human_accepted and the review file no longer lists them, before any other run (found by the adversarial trial:
    both showed the rows as if nothing had been applied)."""
    _cfg, in_review, accepted = stopped_before_core(tmp_path, sp500, sp_emulator, 5.04, lambda sym: sym < "M")
    assert_kept(tmp_path / "out.csv", accepted)
    left = {(r["Symbol"], r["field"]) for r in review_lines(tmp_path / "out.review.csv")}
    assert not left & {(r["Symbol"], r["field"]) for r in accepted}
    assert {(r["Symbol"], r["field"]) for r in in_review if r["Symbol"] >= "M"} <= left


def test_the_review_pages_lines_of_a_row_waiting_for_its_step_show_its_verdicts(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """The review page's fresh lines of rows waiting for core (what it shows after a verdict is posted) have the
    reviewer's decision, as the whole queue and the output do (found by the adversarial trial: still in review)."""
    cfg, _in_review, accepted = stopped_before_core(tmp_path, sp500, sp_emulator, 5.04, lambda sym: sym < "M")
    j, journal, _notes = open_job(cfg, readonly=True)
    try:
        keys = sorted({json.dumps([r["Symbol"]]) for r in accepted})
        fresh = {(ln.row_key, ln.field): ln.decision for ln in row_lines(j, journal, keys)}
        whole = {(ln.row_key, ln.field): ln.decision for ln in build_queue(j, journal).lines if ln.row_key in keys}
    finally:
        journal.close()
    want = {(json.dumps([r["Symbol"]]), r["field"]): "human_accepted" for r in accepted}
    assert {k: fresh.get(k) for k in want} == want and {k: whole.get(k) for k in want} == want


def test_rows_whose_waiting_step_settled_count_as_finished_in_the_progress(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """After verdicts settle some waiting steps, the resumed run's progress ends at every row finished and never
    counts more than the rows (found by the adversarial trial: it ended at 428/503 with the settled rows left out)."""
    cfg_path, _in_review, _accepted = stopped_before_core(tmp_path, sp500, sp_emulator, 5.04, lambda sym: sym < "M")
    cfg = load_config(cfg_path, {"api.base_url": sp_emulator.base_url, "limits.budget_usd": 30})
    journal = Journal.open(tmp_path / "out.csv.journal.sqlite")
    state, seen = JobState(), []

    async def main() -> None:
        client = TaskClient(sp_emulator.base_url, "sk-test-key-1234", timeout_s=5)

        async def watch() -> None:
            while True:
                seen.append(state.finished_rows() + state.in_flight)
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        try:
            await execute(cfg, journal, client, prepare(cfg, journal), emulated=False, state=state)
        finally:
            watcher.cancel()
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        journal.close()
    assert state.completed > 0 and state.finished_rows() == 503 and max(seen) <= 503


def test_twins_waiting_for_one_step_pay_it_once_when_a_verdict_settles_only_one_of_them(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """60 companies twice (dedupe: one run per input); the budget stops before core; a reviewer accepts the review
    fields of the first copies only: plan counts one core step per input in review, the run pays exactly those, and
    the first copies keep their verdicts (found by the adversarial trial: plan counted 0 steps)."""
    lines = sp500.read_text(encoding="utf-8").splitlines()[:61]
    src = tmp_path / "sp500_twins.csv"
    twins = [ln.split(",", 1)[0] + "_2," + ln.split(",", 1)[1] for ln in lines[1:]]
    src.write_text("\n".join([*lines, *twins]) + "\n", encoding="utf-8")
    cfg, in_review, accepted = stopped_before_core(tmp_path, src, sp_emulator, 0.61, lambda s: not s.endswith("_2"))
    inputs = {r["Symbol"].removesuffix("_2") for r in in_review}
    plan = run_enrich("plan", str(cfg), "--budget", "5", key=None)
    assert f"escalation steps     {len(inputs)} pending" in plan.stdout, plan.stdout
    again = run_job(
        load_config(cfg, {"api.base_url": sp_emulator.base_url, "limits.budget_usd": 5}),
        api_key="sk-test-key-1234",
        install_signals=False,
    )
    assert again.exit_code == EXIT_OK, again.message
    sec = dict(pl.read_csv(src, infer_schema=False).select("Symbol", "Security").iter_rows())
    core = [e["input"]["Security"] for e in ledger(sp_emulator) if e["processor"] == "core"]
    assert sorted(core) == sorted(sec[s] for s in inputs)
    assert_kept(tmp_path / "out.csv", accepted)


def test_a_row_climbing_for_another_field_keeps_the_human_decision_on_a_reviewed_one(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """base alone, a reviewer accepts every field in review; then `[escalate]` core on rejected: rows with a rejected
    field climb, and every accepted field stays human_accepted with the value reviewed, never core's answer (found
    by the adversarial trial: core's later answer made the verdicts stale and replaced some values)."""
    cfg = job(tmp_path, sp500, processor="base", out="out.csv")
    assert go(cfg, sp_emulator.base_url).exit_code == EXIT_OK
    accepted = [
        dict(r, verdict="accept", reviewer="ana")
        for r in review_lines(tmp_path / "out.review.csv")
        if r["confidence"] == "medium"
    ]
    assert run_enrich("review", "apply", str(cfg), str(write_review(accepted, tmp_path / "r.csv"))).returncode == 0
    cfg.write_text(cfg.read_text() + '\n[escalate]\nprocessors = ["core"]\non = ["rejected"]\n')
    assert go(cfg, sp_emulator.base_url).exit_code == EXIT_OK
    core = {e["input"]["Security"] for e in ledger(sp_emulator) if e["processor"] == "core"}
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    sec = dict(pl.read_csv(sp500, infer_schema=False).select("Symbol", "Security").iter_rows())
    climbed = [line for line in accepted if sec[line["Symbol"]] in core]
    assert climbed  # some reviewed rows climbed for their other field
    for line in accepted:
        row = out.filter(pl.col("Symbol") == line["Symbol"]).row(0, named=True)
        assert (row[f"{line['field']}__decision"], row[line["field"]]) == ("human_accepted", line["value"]), line


def test_plan_prices_at_most_max_rows_rows_climbing(tmp_path: Path, sp500: Path, sp_emulator: Any) -> None:
    """`max_rows = 10`: plan's worst case is every row on base and 10 rows on core, before the run and after it
    (nothing left); the run pays that at most (found by the adversarial trial: every row on core, $17.61)."""
    extra = '[escalate]\nprocessors = ["core"]\non = ["review"]\nmax_rows = 10\n'
    cfg = job(tmp_path, sp500, extra=extra, processor="base", out="out.csv")

    def worst() -> str:
        out = run_enrich("plan", str(cfg), key=None).stdout
        return next(x for x in out.splitlines() if x.startswith("escalation ladder")).split("worst case ")[1].split()[0]

    assert worst() == "$5.28"  # 503 x $0.01 + 10 x $0.025
    assert go(cfg, sp_emulator.base_url).exit_code == EXIT_OK
    assert sum(e["price_micros"] for e in ledger(sp_emulator)) == 5_280_000 and worst() == "$0.00"


def test_plan_after_a_budget_stop_counts_the_rows_waiting_for_their_step_as_climbing(
    tmp_path: Path, sp500: Path, sp_emulator: Any
) -> None:
    """base>core on review stopped by the budget once every row ran on base: the rows left waiting for core count in
    the share that climbs past base, as rows that climbed would (they counted as none: 0%)."""
    extra = '[escalate]\nprocessors = ["core"]\non = ["review"]\n'
    cfg = job(tmp_path, sp500, extra=extra, processor="base", out="out.csv")
    stopped = run_enrich("run", str(cfg), "--base-url", sp_emulator.base_url, "--budget", "5.04")
    assert stopped.returncode == EXIT_BUDGET, stopped.stderr
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    done = out.filter(pl.col("_enrich_status") != "skipped_budget")
    decisions = [f"{f}__decision" for f in SP_FIELDS]
    climbing = done.filter(pl.any_horizontal(pl.col(c) == "review" for c in decisions)).height
    assert 0 < climbing < done.height == 503
    plan = run_enrich("plan", str(cfg), "--budget", "5.04", key=None)
    line = next(x for x in plan.stdout.splitlines() if x.startswith("escalation ladder"))
    assert f"({climbing / done.height:.0%} of finished rows climb past base)" in line, (climbing, done.height, line)


def test_escalation_survives_kills_without_duplicates(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """SIGKILL at failpoints during escalation rounds, then resume: 0 duplicate runs per (row, processor)."""
    emu = emulator_process(
        "--knowledge",
        str(sp500),
        "--knowledge-key",
        "Security",
        "--hard-rate",
        "0.4",
        "--time-scale",
        "0",
        "--seed",
        "3",
    )
    src = tmp_path / "sp500_head.csv"
    lines = sp500.read_text(encoding="utf-8").splitlines()[:121]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = job(tmp_path, src, extra=ESCALATE, limits="batch_size = 20")
    for point in (
        "after_intent_commit:9",
        "after_response_before_commit:8",
        "after_result_commit:9",
        "after_send_before_response:10",
    ):
        r = run_enrich("run", str(cfg), "--base-url", emu.base_url, env={"ENRICH_FAILPOINT": point})
        assert r.returncode in (-9, 0, 3), r.stderr[-500:]
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr[-800:]
    by_row = per_row_processor(emu.ledger())
    assert max(by_row.values()) == 1, [k for k, v in by_row.items() if v > 1][:5]
    assert len({k[0] for k in by_row}) == 120
    assert {k[1] for k in by_row} >= {"lite-fast", "base"}


def test_review_round_trip(tmp_path: Path, emulator) -> None:
    """Review file lists review/rejected fields; one of each verdict shows human_* decisions and survives a
    re-run; a changed input makes the verdict stale; a bad review file exits 2 and applies nothing."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.0)
    src = tmp_path / "in.csv"
    src.write_text((ROOT / "data/companies.csv").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = job(tmp_path, src, out="out.csv")
    cfg.write_text(cfg.read_text().replace("[emulator]", f'[api]\nbase_url = "{emu.base_url}"\n\n[emulator]'))
    assert run_enrich("run", str(cfg)).returncode == 0
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    review_file = tmp_path / "out.review.csv"
    with review_file.open(encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    expect = {
        (r["company"], fld)
        for r in out.iter_rows(named=True)
        for fld in FIELDS
        if r[f"{fld}__decision"] in ("review", "rejected")
    }
    assert {(r["company"], r["field"]) for r in lines} == expect and len(lines) >= 3

    def write(rows: list[dict[str, str]], path: Path) -> Path:
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(lines[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    year = next(r for r in lines if r["field"] == "founded_year")
    others = [r for r in lines if r is not year][:2]
    filled = [
        dict(year, verdict="correct", corrected_value="1901", reviewer="ana"),
        dict(others[0], verdict="accept", reviewer="ana"),
        dict(others[1], verdict="reject", reviewer="bo"),
    ]
    bad_cases = {
        "verdict": [dict(filled[0], verdict="maybe")],
        "type": [dict(filled[0], corrected_value="nineteen-oh-one")],
        "key": [dict(filled[0], company="No Such Company")],
        "field": [dict(filled[0], field="ceo")],
    }
    for name, rows in bad_cases.items():
        r = run_enrich("review", "apply", str(cfg), str(write(rows, tmp_path / f"bad-{name}.csv")))
        assert r.returncode == 2 and ".csv:2:" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    assert pl.read_csv(tmp_path / "out.csv", infer_schema=False).equals(out)  # nothing applied

    r = run_enrich("review", "apply", str(cfg), str(write(filled, tmp_path / "reviewed.csv")))
    assert r.returncode == 0, r.stderr

    def decisions() -> dict[tuple[str, str], tuple[str, str]]:
        df = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
        return {
            (row["company"], fld): (row[f"{fld}__decision"], row[fld] or "")
            for row in df.iter_rows(named=True)
            for fld in FIELDS
        }

    got = decisions()
    assert got[(year["company"], "founded_year")] == ("human_corrected", "1901")
    assert got[(others[0]["company"], others[0]["field"])][0] == "human_accepted"
    assert got[(others[1]["company"], others[1]["field"])] == ("human_rejected", "")
    runs = len(ledger(emu))
    assert run_enrich("run", str(cfg)).returncode == 0 and decisions() == got and len(ledger(emu)) == runs

    text = src.read_text(encoding="utf-8")  # change that row's input: the verdict goes stale
    row_line = next(ln for ln in text.splitlines() if ln.startswith(year["company"] + ","))
    changed = row_line.replace("https://", "https://new.", 1)
    assert changed != row_line
    src.write_text(text.replace(row_line, changed), encoding="utf-8")
    assert run_enrich("run", str(cfg)).returncode == 0
    assert decisions()[(year["company"], "founded_year")][0] in ("accepted", "review", "rejected")
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    history = j.verdicts_for([json.dumps([year["company"]])]).get(json.dumps([year["company"]]), [])
    assert any(v[0] == "founded_year" and v[1] == "correct" for v in history)  # kept in the history
    j.close()


def test_a_verdict_on_a_row_skipped_by_where_is_refused(tmp_path: Path, emulator) -> None:
    """A review file from before `[input] where` left a row out: a verdict on that row (its output shows no value)
    is refused in one line, exit 2, and nothing of the file is applied (found by the adversarial trial)."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.0)
    src = tmp_path / "in.csv"
    src.write_text((ROOT / "data/companies.csv").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = job(tmp_path, src, out="out.csv")
    cfg.write_text(cfg.read_text().replace("[emulator]", f'[api]\nbase_url = "{emu.base_url}"\n\n[emulator]'))
    assert run_enrich("run", str(cfg)).returncode == 0
    with (tmp_path / "out.review.csv").open(encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    line = lines[0]
    reviewed = tmp_path / "reviewed.csv"
    with reviewed.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(line))
        w.writeheader()
        w.writerow(dict(line, verdict="accept", reviewer="ana"))
    company = line["company"].replace("'", "''")
    cfg.write_text(cfg.read_text().replace("[input]\n", f"[input]\nwhere = \"company != '{company}'\"\n", 1))
    assert run_enrich("run", str(cfg)).returncode == 0
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    assert out.filter(pl.col("company") == line["company"])["_enrich_status"].to_list() == ["skipped"]
    r = run_enrich("review", "apply", str(cfg), str(reviewed))
    assert r.returncode == 2 and "skipped by [input] where" in r.stderr and "Traceback" not in r.stderr, r.stderr
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    assert not j.verdicts_for([json.dumps([line["company"]])])
    j.close()


def test_lite_base_lite_reuses_what_was_paid(tmp_path: Path, emulator) -> None:
    """Switching the processor back reuses the stored results: the third run creates 0 runs."""
    emu = emulator(time_scale=0.0)
    cfg = job(tmp_path, ROOT / "data/companies.csv", out="demo.parquet")
    counts = []
    for proc in ("lite-fast", "base", "lite-fast"):
        r = run_job(
            load_config(cfg, {"api.base_url": emu.base_url, "task.processor": proc}),
            api_key="sk-test-1234",
            install_signals=False,
        )
        assert r.exit_code == EXIT_OK
        counts.append(len(ledger(emu)))
    assert counts == [55, 110, 110]


def test_daily_budget_shared_by_two_jobs(tmp_path: Path, emulator) -> None:
    """Two jobs on one spend ledger never exceed the daily budget together; the next UTC day allows more."""
    emu = emulator(time_scale=0.0)
    shared = tmp_path / "spend.sqlite"
    limits = f'daily_budget_usd = 0.2\nspend_ledger = "{shared}"'  # lite-fast is $0.005: 40 runs a day
    a = go(job(tmp_path, ROOT / "data/companies.csv", out="a.csv", name="a.toml", limits=limits), emu.base_url)
    b = go(job(tmp_path, ROOT / "data/companies.csv", out="b.csv", name="b.toml", limits=limits), emu.base_url)
    assert a.exit_code == EXIT_BUDGET and b.exit_code == EXIT_BUDGET and "resets at" in b.message
    assert len(ledger(emu)) == 40
    assert a.counts.get("done", 0) + b.counts.get("done", 0) == 40

    j = Journal.open(tmp_path / "b.csv.journal.sqlite")
    j.attach_ledger(shared, "b")
    epoch = j.get("epoch")
    with pytest.raises(DailyBudgetExceeded):
        j.claim(epoch, 5, {"lite-fast": 5000}, None, now=__import__("time").time(), batch=999, daily_budget=200_000)
    tomorrow = __import__("time").time() + 86_400
    assert len(j.claim(epoch, 5, {"lite-fast": 5000}, None, now=tomorrow, batch=999, daily_budget=200_000)) == 5
    j.close()


def test_budget_stop_during_escalation_costs_nothing_extra(tmp_path: Path, emulator) -> None:
    """Stopped by the budget mid-ladder, re-run without budget, then with: same runs as one uninterrupted job,
    answers already paid for stay in the output meanwhile, and run ids are stable on a re-run."""
    emu = emulator(hard_rate=0.25, time_scale=0.0)
    src = ROOT / "data/companies.csv"
    whole = job(tmp_path, src, extra='[escalate]\nprocessors = ["base"]\n', out="whole.csv", name="whole.toml")
    assert go(whole, emu.base_url).exit_code == EXIT_OK
    uninterrupted = len(ledger(emu))
    cfg = job(tmp_path, src, extra='[escalate]\nprocessors = ["base"]\n', out="part.csv", name="part.toml")
    first = run_job(
        load_config(cfg, {"api.base_url": emu.base_url, "limits.budget_usd": 0.1}),
        api_key="sk-test-key-1234",
        install_signals=False,
    )
    again = run_job(
        load_config(cfg, {"api.base_url": emu.base_url, "limits.budget_usd": 0.1}),
        api_key="sk-test-key-1234",
        install_signals=False,
    )
    assert first.exit_code == again.exit_code == EXIT_BUDGET
    assert again.report["status_counts"]["completed"] == first.report["status_counts"]["completed"] == 20
    done = go(cfg, emu.base_url)
    assert done.exit_code == EXIT_OK and len(ledger(emu)) - uninterrupted == uninterrupted
    a = pl.read_csv(tmp_path / "part.csv", infer_schema=False)
    b = pl.read_csv(tmp_path / "whole.csv", infer_schema=False)
    assert a.drop("_enrich_run_id", "_enrich_latency_s").equals(b.drop("_enrich_run_id", "_enrich_latency_s"))
    go(cfg, emu.base_url)
    assert pl.read_csv(tmp_path / "part.csv", infer_schema=False)["_enrich_run_id"].equals(a["_enrich_run_id"])
