"""`enrich pilot`: a seeded sample researched on each processor in the job's own journal, and the forecasts.

The end-to-end tests run the CLI against the emulator over loopback (a separate process, so the pilot can be
SIGKILLed) and count what was paid for in the emulator's ledger (every run ever created, with its input and
processor). The forecast tests are pure arithmetic on hand-made samples.
"""

from __future__ import annotations

import json
import random
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from enrich.config import config_from_mapping
from enrich.errors import ConfigError
from enrich.job import pilot_processors
from enrich.pilot import (
    Limits,
    Observation,
    Strategy,
    compare,
    forecast,
    format_pilot,
    merged,
    predictive,
    processor_report,
    quantile,
    recommend,
    replay,
    resamples,
    selection_optimism,
    strategies,
)
from enrich.pilot_page import place_labels, render
from tests.conftest import run_enrich, write_config

PRICES = {"lite": 5_000, "base": 10_000, "core": 25_000}
LIMITS = Limits(max_in_flight=100, requests_per_minute=1800, batch_size=100)
FIELDS = {"headquarters_location": "string", "gics_sector": "string"}
EMU = ("--knowledge-key", "Security", "--time-scale", "0.001", "--hard-rate", "0.3")


def obs(*decisions: str, latency: float = 1.0) -> Observation:
    names = ["a", "b"][: len(decisions)]
    return Observation(dict(zip(names, decisions, strict=True)), {n: "x" for n in names}, latency)


# ---- forecast arithmetic (pure) --------------------------------------------------------------------------------


def test_strategies_are_every_processor_and_every_ordered_ladder_under_each_on() -> None:
    """Three processors: 3 singles and 4 ladders x 3 `on` = 15, each ladder climbing in the listed order."""
    got = strategies(["lite", "base", "core"])
    assert len(got) == 15
    assert [s.ladder for s in got[:3]] == [("lite",), ("base",), ("core",)]
    ladders = {s.ladder for s in got[3:]}
    assert ladders == {("lite", "base"), ("lite", "core"), ("base", "core"), ("lite", "base", "core")}
    assert Counter(s.on for s in got[3:]) == {("rejected",): 4, ("review",): 4, ("rejected", "review"): 4}


def test_replay_climbs_as_escalation_does_and_keeps_the_best_decision() -> None:
    """A row climbs while a merged field is in `on`; a field accepted low down stays accepted above."""
    row = {"lite": obs("accepted", "rejected"), "base": obs("rejected", "review"), "core": obs("review", "accepted")}
    on_rej = replay(row, Strategy(("lite", "base", "core"), ("rejected",)), ["a", "b"], PRICES)
    assert on_rej.tried == ("lite", "base") and on_rej.cost_micros == 15_000 and on_rej.accepted == 1
    on_both = replay(row, Strategy(("lite", "base", "core"), ("rejected", "review")), ["a", "b"], PRICES)
    assert on_both.tried == ("lite", "base", "core") and on_both.cost_micros == 40_000 and on_both.accepted == 2
    alone = replay(row, Strategy(("base",)), ["a", "b"], PRICES)
    assert alone.tried == ("base",) and alone.accepted == 0
    missing = replay(
        {"lite": None, "core": obs("accepted", "accepted")},
        Strategy(("lite", "core"), ("rejected",)),
        ["a", "b"],
        PRICES,
    )
    assert missing.tried == ("lite", "core") and missing.accepted == 2  # a run without a result climbs


def test_forecast_of_identical_rows_has_no_cost_spread_and_counts_the_sampled_rows_as_the_full_run_keeps_them() -> None:
    """10 identical rows, 110 in the file: the full run pays 100 x the rate (interval a point); the sampled rows are
    counted with their best answer across the ladder, the other 100 at the strategy's rate; 20 cells do not make
    that rate certain (the accepted interval is not a point)."""
    sample = [{"lite": obs("accepted", "rejected"), "core": obs("accepted", "accepted")} for _ in range(10)]
    f = forecast(sample, ["a", "b"], Strategy(("lite",)), PRICES, rows_total=110, limits=LIMITS, seed=1)
    assert f.to_pay_usd == pytest.approx(100 * 0.005) and f.to_pay_lo == f.to_pay_hi == pytest.approx(f.to_pay_usd)
    assert f.accepted == pytest.approx(0.5) and f.accepted_lo < 0.4 and f.accepted_hi > 0.6
    ladder = forecast(
        sample, ["a", "b"], Strategy(("lite", "core"), ("rejected",)), PRICES, rows_total=110, limits=LIMITS
    )
    assert ladder.to_pay_usd == pytest.approx(100 * 0.030) and ladder.accepted == pytest.approx(1.0)
    assert ladder.climbs == {"lite": 1.0, "core": 1.0}


def test_forecast_interval_is_the_bootstrap_of_the_rows_seeded_and_contains_the_mean() -> None:
    """Half the rows climb: the interval brackets the mean, is the same for the same seed, and narrows with a
    bigger sample of the same mix."""

    def sample(n: int) -> list[dict[str, Observation | None]]:
        return [{"lite": obs("accepted" if i % 2 else "rejected"), "core": obs("accepted")} for i in range(n)]

    s = Strategy(("lite", "core"), ("rejected",))
    small = forecast(sample(20), ["a"], s, PRICES, rows_total=1020, limits=LIMITS, seed=7)
    again = forecast(sample(20), ["a"], s, PRICES, rows_total=1020, limits=LIMITS, seed=7)
    big = forecast(sample(200), ["a"], s, PRICES, rows_total=1200, limits=LIMITS, seed=7)
    assert small.to_pay_lo < small.to_pay_usd < small.to_pay_hi
    assert (small.to_pay_lo, small.to_pay_hi) == (again.to_pay_lo, again.to_pay_hi)
    assert small.cost_per_row_usd == pytest.approx(0.0175)  # 0.005 + half of 0.025
    width = lambda f: (f.to_pay_hi - f.to_pay_lo) / f.to_pay_usd  # noqa: E731
    assert width(big) < width(small) / 2


def test_recommend_takes_the_cheapest_meeting_the_target_else_the_most_accepted_per_dollar() -> None:
    """Target met by two: the cheaper one; met by none: the best accepted share per dollar."""
    sample = [
        {"lite": obs("rejected", "accepted"), "base": obs("accepted", "review"), "core": obs("accepted", "accepted")}
    ]
    fcs = [forecast(sample * 5, ["a", "b"], s, PRICES, rows_total=100, limits=LIMITS) for s in strategies(list(PRICES))]
    i, why = recommend(fcs, 0.9)
    assert fcs[i].strategy.name == "lite>base on rejected" and "cheapest" in why  # $0.015 a row, all accepted
    j, why = recommend(fcs, 1.01)
    per_dollar = [f.accepted / f.cost_per_row_usd for f in fcs]
    assert per_dollar[j] == max(per_dollar) and "per dollar" in why


def test_processor_report_shares_fill_agreement_and_latency() -> None:
    """Decision shares per field, fill rate, agreement with the strongest processor, latency quantiles."""
    sample = [
        {
            "lite": Observation({"a": "accepted"}, {"a": "Paris"}, 1.0),
            "core": Observation({"a": "accepted"}, {"a": "paris "}, 4.0),
        },
        {
            "lite": Observation({"a": "review"}, {"a": "Rome"}, 3.0),
            "core": Observation({"a": "accepted"}, {"a": "Milan"}, 6.0),
        },
        {"lite": None, "core": Observation({"a": "rejected"}, {"a": None}, 8.0)},
        {
            "lite": Observation({"a": "rejected"}, {"a": None}, 5.0),
            "core": Observation({"a": "accepted"}, {"a": "Oslo"}, 2.0),
        },
    ]
    rep = processor_report(sample, ["a"], ["lite", "core"], PRICES)
    assert rep["lite"]["decisions"]["a"] == {"accepted": 0.25, "review": 0.25, "rejected": 0.5}
    assert rep["lite"]["fill_rate"] == 0.5 and rep["core"]["fill_rate"] == 0.75
    assert rep["lite"]["agreement"]["a"] == 0.3333 and rep["core"]["agreement"]["a"] == 1.0
    assert rep["lite"]["latency_p50_s"] == 3.0 and rep["core"]["latency_p95_s"] == pytest.approx(7.7)
    assert rep["lite"]["runs"] == 3 and rep["core"]["cost_usd"] == 0.1


# ---- end to end against the emulator -------------------------------------------------------------------------


def job(
    d: Path, sp500: Path, rows: int = 60, *, limits: str = "batch_size = 10\nmax_in_flight = 40", extra: str = ""
) -> Path:
    """A job over the first `rows` S&P companies researching two fields, lite first."""
    lines = sp500.read_text(encoding="utf-8").splitlines()
    src = d / "sp.csv"
    src.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return write_config(
        d / "job.toml",
        input_path=src,
        output=d / "out.csv",
        key=["Symbol"],
        columns=["Security"],
        fields=FIELDS,
        processor="lite",
        limits=limits,
        extra=extra,
    )


def with_ladder(cfg: Path, ladder: list[str], on: list[str]) -> None:
    cfg.write_text(cfg.read_text() + f"\n[escalate]\nprocessors = {json.dumps(ladder)}\non = {json.dumps(on)}\n")


def paid(ledger: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((r["input"]["Security"], r["processor"]) for r in ledger)


def test_pilot_then_run_pays_at_most_once_per_row_and_processor(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """A 20-row pilot on lite, base, core makes 60 runs; the full run with the ladder lite>base>core afterwards
    pays for no piloted (row, processor) again: at most one run per (row, processor) across both."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500)
    r = run_enrich(
        "pilot", str(cfg), "--base-url", emu.base_url, "--rows", "20", "--seed", "3", "--processors", "lite,base,core"
    )
    assert r.returncode == 0, r.stderr
    pilot = paid(emu.ledger())
    assert len(pilot) == 60 and max(pilot.values()) == 1
    assert Counter(p for _, p in pilot) == {"lite": 20, "base": 20, "core": 20}
    sampled = {s for s, _ in pilot}
    r = run_enrich(
        "pilot", str(cfg), "--base-url", emu.base_url, "--rows", "20", "--seed", "3", "--processors", "lite,base,core"
    )
    assert r.returncode == 0 and paid(emu.ledger()) == pilot, r.stderr  # the same pilot again pays nothing
    assert "$0.0000 of it not paid yet" in r.stderr
    assert "the whole file (60 rows) on core alone: $1.5000, the pilot 53% of it" in r.stderr  # $0.80 of $1.50
    data = json.loads((tmp_path / "out.pilot.json").read_text())
    assert data["sample_rows"] == 20 and data["rows_total"] == 60 and len(data["strategies"]) == 15
    assert sum(s["recommended"] for s in data["strategies"]) == 1 and "[task]" in data["recommended"]["toml"]
    assert "<svg" in (tmp_path / "out.pilot.html").read_text()
    with_ladder(cfg, ["base", "core"], ["rejected"])
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    both = paid(emu.ledger())
    assert max(both.values()) == 1, both.most_common(3)
    run_only = both - pilot
    assert not {s for s, _ in run_only} & sampled  # a piloted row is paid again on no processor
    assert Counter(p for _, p in run_only)["lite"] == 40  # every other row once on the first rung


def test_escalation_climbing_onto_a_piloted_processor_does_not_pay_it_again(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """Pilot on core alone; the full run lite>core pays lite for the piloted rows (new), never core again."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500, rows=40)
    r = run_enrich("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "15", "--processors", "core")
    assert r.returncode == 0, r.stderr
    pilot = paid(emu.ledger())
    assert len(pilot) == 15 and {p for _, p in pilot} == {"core"}
    with_ladder(cfg, ["core"], ["rejected", "review"])
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    both = paid(emu.ledger())
    assert max(both.values()) == 1, both.most_common(3)
    climbed = {s for (s, p) in both - pilot if p == "core"}
    assert climbed and not climbed & {s for s, _ in pilot}  # others climbed onto core; piloted rows did not pay it


@pytest.mark.parametrize(
    "point",
    [
        "after_intent_commit:3",
        "after_send_before_response:4",
        "after_result_commit:3",
        "after_response_before_commit:3",
        "mid_poll:1",
        "mid_write:1",
    ],
)
def test_a_sigkill_during_the_pilot_then_pilot_again_still_pays_once(
    tmp_path: Path, sp500: Path, emulator_process, point: str
) -> None:
    """SIGKILL during the pilot (a pass's claim, send, poll or result, or the findings' write), then the same
    pilot again, then the full run: every sampled (row, processor) has one run, and none has two."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500, rows=40)
    args = ("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "20", "--processors", "lite,base,core")
    r = run_enrich(*args, env={"ENRICH_FAILPOINT": point})
    assert r.returncode == -9, (r.returncode, r.stderr)
    r = run_enrich(*args)
    assert r.returncode == 0, r.stderr
    pilot = paid(emu.ledger())
    assert max(pilot.values()) == 1, pilot.most_common(3)
    assert Counter(p for _, p in pilot) == {"lite": 20, "base": 20, "core": 20}
    with_ladder(cfg, ["base", "core"], ["rejected", "review"])
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    assert max(paid(emu.ledger()).values()) == 1


def test_a_pilot_over_the_budget_is_refused_before_any_request(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """20 rows x lite+base+core = $0.80 at worst; a $0.50 budget: exit 2, one line, no request reached the API."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500)
    r = run_enrich(
        "pilot",
        str(cfg),
        "--base-url",
        emu.base_url,
        "--rows",
        "20",
        "--budget",
        "0.5",
        "--processors",
        "lite,base,core",
    )
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "worst case $0.8000 exceeds the budget" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert emu.stats()["total_requests"] == 0 and emu.ledger() == []
    assert not (tmp_path / "out.pilot.json").exists()
    r = run_enrich(
        "pilot",
        str(cfg),
        "--base-url",
        emu.base_url,
        "--rows",
        "20",
        "--budget",
        "0.8",
        "--processors",
        "lite,base,core",
    )
    assert r.returncode == 0, r.stderr  # exactly the worst case fits


def test_plan_shows_the_pilot_forecast_once_a_pilot_exists(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """Before a pilot, plan prices at list price; after one, it also prints the pilot's forecast for the config's
    own strategy (cost still to pay and accepted share with their intervals)."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500)
    with_ladder(cfg, ["core"], ["rejected"])
    before = run_enrich("plan", str(cfg), key=None)
    assert before.returncode == 0 and "pilot" not in before.stdout
    assert run_enrich("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "20").returncode == 0
    data = json.loads((tmp_path / "out.pilot.json").read_text())
    mine = next(s for s in data["strategies"] if s["name"] == "lite>core on rejected")
    after = run_enrich("plan", str(cfg), key=None)
    assert after.returncode == 0, after.stderr
    line = next(x for x in after.stdout.splitlines() if x.startswith("pilot forecast"))
    assert f"${mine['to_pay_usd']:,.4f}" in line and f"{mine['accepted']:.0%}" in line, after.stdout
    # plan's own escalation estimate replays the same piloted rows: the same figure, not the first step alone
    ladder = next(x for x in after.stdout.splitlines() if x.startswith("escalation ladder"))
    assert f"estimate ${mine['to_pay_usd']:,.2f} (" in ladder, after.stdout
    text = cfg.read_text()
    for on, name in ((["review"], "lite>core on review"), (["review", "rejected"], "lite>core on rejected+review")):
        cfg.write_text(text.replace('on = ["rejected"]', f"on = {json.dumps(on)}"))  # `on` in either order
        theirs = next(s for s in data["strategies"] if s["name"] == name)
        again = run_enrich("plan", str(cfg), key=None)
        line = next(x for x in again.stdout.splitlines() if x.startswith("pilot forecast"))
        assert line.startswith(f"pilot forecast       {name}: to pay ${theirs['to_pay_usd']:,.4f}"), again.stdout


def test_under_a_gate_that_sends_nothing_to_review_the_pilot_offers_no_on_review_ladder(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """review = [] everywhere: no "on review" strategy (it never climbs, and its config is refused); the
    recommended snippet, pasted in, is a config `plan` accepts."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    gate = '[gate]\naccept = ["high"]\nreview = []\nreject = ["medium", "low", "none"]\n'
    cfg = job(tmp_path, sp500, rows=30, extra=gate)
    r = run_enrich("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "10", "--processors", "lite,core")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "out.pilot.json").read_text())
    names = [s["name"] for s in data["strategies"]]
    assert names == ["lite", "core", "lite>core on rejected", "lite>core on rejected+review"], names
    snippet = tomllib.loads(data["recommended"]["toml"])
    text = cfg.read_text().replace('processor = "lite"', f"processor = {json.dumps(snippet['task']['processor'])}")
    if "escalate" in snippet:
        text += "\n[escalate]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in snippet["escalate"].items())
    cfg.write_text(text)
    assert run_enrich("plan", str(cfg), key=None).returncode == 0


def test_compare_marks_one_recommendation_and_its_snippet_is_valid_toml() -> None:
    """The findings mark exactly one strategy and its snippet parses as [task]/[escalate] tables."""
    sample = [{"lite": obs("rejected"), "core": obs("accepted")}, {"lite": obs("accepted"), "core": obs("accepted")}]
    data = compare(sample, ["a"], ["lite", "core"], PRICES, rows_total=50, limits=LIMITS, seed=0, target=0.9)
    assert [s["recommended"] for s in data["strategies"]].count(True) == 1
    snippet = tomllib.loads(data["recommended"]["toml"])
    assert snippet["task"]["processor"] == "lite" and snippet["escalate"]["processors"] == ["core"]


def test_the_charts_numbers_of_strategies_that_land_together_do_not_overlap() -> None:
    """Three strategies within a few pixels (core alone and a dear ladder often are): three label boxes apart."""
    points = [(300.0, 120.0, 4.0), (303.0, 121.0, 4.0), (300.0, 124.0, 7.0)]
    spots = place_labels(points, ["3", "12", "15"])
    boxes = [(x, y - 9, x + 7 * len(t), y + 2) for (x, y), t in zip(spots, ["3", "12", "15"], strict=True)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_the_pilot_page_escapes_every_text() -> None:
    """A field name and a job name holding markup are shown as text on the page and in its chart."""
    evil = '<script>alert(1)</script>"'
    sample = [
        {
            "lite": Observation({evil: "accepted"}, {evil: "x"}, 1.0),
            "core": Observation({evil: "review"}, {evil: "y"}, 2.0),
        }
    ]
    data = compare(sample, [evil], ["lite", "core"], PRICES, rows_total=10, limits=LIMITS, seed=0, target=0.9)
    page = render({**data, "job": evil, "seed": 0})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in page
    assert page.count("<svg") == 1 and "<circle" in page


def test_predictive_draws_include_the_scatter_of_the_rows_left() -> None:
    """Fewer rows left to research scatter their mean more: the draws spread wider, around the sample's mean."""
    values = [float(i % 2) for i in range(40)]
    boot = resamples(40, 3, 400)
    few, many = predictive(values, boot, 5, 3), predictive(values, boot, 100_000, 3)
    spread = lambda xs: quantile(xs, 0.95) - quantile(xs, 0.05)  # noqa: E731
    assert spread(few) > 1.5 * spread(many)
    assert abs(sum(many) / len(many) - 0.5) < 0.02


def test_the_90_percent_intervals_hold_the_actual_in_most_samples_of_a_known_population() -> None:
    """A synthetic file of 500 rows (lite accepts a field with p 0.7, core with 0.92): over 150 pilots of 40 rows,
    the cost and accepted intervals of lite>core on rejected hold the full run's actual figures at least 80% of
    the time (a point estimate or a too narrow interval would not)."""
    rng = random.Random(11)

    def cell(p: float) -> str:
        return "accepted" if rng.random() < p else rng.choice(["review", "rejected"])

    population = [{"lite": obs(cell(0.7), cell(0.7)), "core": obs(cell(0.92), cell(0.92))} for _ in range(500)]
    s = Strategy(("lite", "core"), ("rejected",))
    cost_hits = acc_hits = 0
    for t in range(150):
        idx = set(rng.sample(range(500), 40))
        sample = [population[i] for i in sorted(idx)]
        f = forecast(sample, ["a", "b"], s, PRICES, rows_total=500, limits=LIMITS, boot=resamples(40, t, 300), seed=t)
        cost = sum(replay(population[i], s, ["a", "b"], PRICES).cost_micros for i in range(500) if i not in idx) / 1e6
        acc = (
            sum(
                sum(d == "accepted" for d in merged(r, s.ladder, ["a", "b"]).values())
                if i in idx
                else replay(r, s, ["a", "b"], PRICES).accepted
                for i, r in enumerate(population)
            )
            / 1000
        )
        cost_hits += f.to_pay_lo - 1e-9 <= cost <= f.to_pay_hi + 1e-9
        acc_hits += f.accepted_lo - 1e-9 <= acc <= f.accepted_hi + 1e-9
    assert cost_hits >= 0.8 * 150 and acc_hits >= 0.8 * 150, (cost_hits, acc_hits)


def test_the_selection_correction_makes_the_picked_strategys_interval_hold_the_actual_more_often() -> None:
    """A file where lite's true share (86%) is below the 90% target: the pilots that recommend the cheap strategy do
    so because their sample flattered lite; its uncorrected interval holds the full run's share in under 65% of
    them, the interval corrected by the bootstrap selection optimism in at least 70%, and the mean error shrinks."""
    rng = random.Random(5)
    fields = ["a", "b", "c"]

    def cell(p: float) -> str:
        return "accepted" if rng.random() < p else "review"

    population = [
        {
            "lite": Observation({f: cell(0.86) for f in fields}, {}),
            "core": Observation({f: cell(0.97) for f in fields}, {}),
        }
        for _ in range(500)
    ]
    strats = strategies(["lite", "core"])
    cheap = Strategy(("lite", "core"), ("rejected",))  # never climbs here ('review' only): lite's cost and rate
    picked = raw_hits = hits = 0
    raw_error = error = 0.0
    for t in range(300):
        idx = set(rng.sample(range(500), 40))
        sample = [population[i] for i in sorted(idx)]
        boot = resamples(40, t, 200)
        fcs = [forecast(sample, fields, s, PRICES, rows_total=500, limits=LIMITS, seed=t, boot=boot) for s in strats]
        i, _ = recommend(fcs, 0.9)
        if strats[i] != cheap:
            continue
        opt = selection_optimism(sample, fields, strats, PRICES, rows_total=500, boot=boot, target=0.9)
        fixed = forecast(
            sample, fields, cheap, PRICES, rows_total=500, limits=LIMITS, seed=t, boot=boot,
            optimism=opt["recommended"]["accepted"],
        )  # fmt: skip
        kept = (
            sum(d == "accepted" for d in merged(r, cheap.ladder, fields).values())
            if j in idx
            else replay(r, cheap, fields, PRICES).accepted
            for j, r in enumerate(population)
        )
        actual = sum(kept) / 1500
        picked += 1
        raw_hits += fcs[i].accepted_lo <= actual <= fcs[i].accepted_hi
        hits += fixed.accepted_lo <= actual <= fixed.accepted_hi
        raw_error += fcs[i].accepted - actual
        error += fixed.accepted - actual
    assert picked >= 40, picked
    assert raw_hits < 0.65 * picked and hits >= 0.70 * picked, (picked, raw_hits, hits)
    assert 0 < error < raw_error, (error, raw_error)


def test_compare_corrects_the_recommended_forecast_and_names_the_rule_and_the_most_accepted() -> None:
    """The recommended strategy's accepted share is lowered by the selection optimism (its interval widened down to
    match); the text names the rule that picked it and shows the strategy with the most accepted share beside."""
    rng = random.Random(2)

    def cell(p: float) -> str:
        return "accepted" if rng.random() < p else rng.choice(["review", "rejected"])

    sample = [{"lite": obs(cell(0.85), cell(0.85)), "core": obs(cell(0.95), cell(0.95))} for _ in range(30)]
    data = compare(sample, ["a", "b"], ["lite", "core"], PRICES, rows_total=300, limits=LIMITS, seed=0, target=0.9)
    rec = next(s for s in data["strategies"] if s["recommended"])
    assert data["selection"]["recommended"]["accepted"] > 0 and rec["selection_optimism"] > 0
    assert rec["accepted"] < rec["accepted_uncorrected"]
    assert rec["accepted_interval"][0] < rec["accepted_interval_uncorrected"][0]
    assert rec["accepted_interval"][1] == rec["accepted_interval_uncorrected"][1]
    best = max(data["strategies"], key=lambda s: s["accepted_uncorrected"] or s["accepted"])
    assert data["most_accepted"]["name"] == best["name"] != rec["name"]
    text = format_pilot(data)
    assert "picked by the rule: the cheapest strategy expected to accept at least 90%" in text
    assert f"most accepted share: {best['name']}" in text and text.count("[task]") == 2
    none = compare(sample, ["a", "b"], ["lite", "core"], PRICES, rows_total=300, limits=LIMITS, seed=0, target=1.01)
    assert none["recommended"]["rule"] == "most accepted per dollar"
    assert "picked by the fallback rule, as no strategy is expected to accept 101%" in format_pilot(none)


def test_without_processors_the_pilot_tries_the_jobs_own_ladder_else_lite_base_core(tmp_path: Path) -> None:
    """No --processors: a config with a processor and a ladder pilots that ladder in order, one with a processor
    alone that processor, one with neither lite,base,core; --processors wins over both."""

    def cfg(task: dict[str, Any], escalate: dict[str, Any] | None = None) -> Any:
        data: dict[str, Any] = {
            "input": {"path": str(tmp_path / "in.csv"), "key": ["k"], "columns": ["c"]},
            "task": {"instruction": "x", "output": {"f": {"type": "string"}}, **task},
            "output": {"path": str(tmp_path / "out.csv")},
        }
        if escalate:
            data["escalate"] = escalate
        return config_from_mapping(data)

    assert pilot_processors(cfg({"processor": "lite"}, {"processors": ["core"]}), None) == ["lite", "core"]
    assert pilot_processors(cfg({"processor": "base"}), None) == ["base"]
    assert pilot_processors(cfg({}, {"processors": ["core"]}), None) == ["lite-fast", "core"]
    assert pilot_processors(cfg({}), None) == ["lite", "base", "core"]
    assert pilot_processors(cfg({"processor": "lite"}), ["base", "core"]) == ["base", "core"]


def test_processors_empty_or_above_max_processor_are_refused_and_the_default_stops_at_the_cap(tmp_path: Path) -> None:
    """`--processors ''` is refused (it meant the default, and paid for it); under `max_processor = "base"` the
    default list stops at base, and an explicit `core` is refused naming --processors, not `[task] processor`."""

    def cfg(limits: dict[str, Any]) -> Any:
        return config_from_mapping(
            {
                "input": {"path": str(tmp_path / "in.csv"), "key": ["k"], "columns": ["c"]},
                "task": {"instruction": "x", "output": {"f": {"type": "string"}}},
                "output": {"path": str(tmp_path / "out.csv")},
                "limits": limits,
            }
        )

    with pytest.raises(ConfigError, match="--processors: name at least one processor"):
        pilot_processors(cfg({}), [])
    assert pilot_processors(cfg({"max_processor": "base"}), None) == ["lite", "base"]
    with pytest.raises(ConfigError, match=r"--processors: 'core' is above \[limits\] max_processor = 'base'"):
        pilot_processors(cfg({"max_processor": "base"}), ["lite", "core"])


def test_after_a_pilot_status_and_the_progress_line_do_not_count_held_out_rows_as_finished(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """60 rows, 20 piloted: each pass's progress line counts 20 rows (never 60, 40 of them set aside); status then
    shows the job's view: the 20 piloted rows done on its first tier, 40 pending (none skipped, none held out)."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500)
    r = run_enrich("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "20", "--processors", "lite,core")
    assert r.returncode == 0, r.stderr
    progress = [x for x in r.stderr.splitlines() if "rows finished" in x]
    assert progress and all("/20 rows finished" in x for x in progress), progress
    info = json.loads(run_enrich("status", str(cfg), "--json").stdout)
    assert info["held_out"] == 0 and info["counts"] == {"done": 20, "pending": 40} and info["rows"] == 60, info
    assert "skipped" not in run_enrich("status", str(cfg)).stdout
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    after = json.loads(run_enrich("status", str(cfg), "--json").stdout)
    assert after["held_out"] == 0 and after["counts"] == {"done": 60}, after


def test_a_pilot_after_a_finished_run_leaves_its_output_whole(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """run, then pilot on other processors: the journal shows the job again, not the pilot's last pass, so export
    writes every row completed with its values, and nothing is paid again (found by the adversarial trial: 31 of 55
    rows were exported `skipped`, without values)."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500)
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    before = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    r = run_enrich("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "10", "--processors", "lite,base,core")
    assert r.returncode == 0, r.stderr
    info = json.loads(run_enrich("status", str(cfg), "--json").stdout)
    assert info["counts"] == {"done": 60}, info
    assert run_enrich("export", str(cfg), "--output", str(tmp_path / "again.csv")).returncode == 0
    again = pl.read_csv(tmp_path / "again.csv", infer_schema=False)
    assert again["_enrich_status"].to_list() == ["completed"] * 60
    # rows the pilot did not sample are as the run wrote them; sampled ones keep their best answer (as escalation
    # merges), and every row keeps its values
    pairs = zip(before["Symbol"], before.rows(), again.select(before.columns).rows(), strict=True)
    changed = {k for k, a, b in pairs if a != b}
    assert len(changed) <= 10, changed
    for f in FIELDS:
        assert again[f].null_count() <= before[f].null_count()
    runs = len(emu.ledger())
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == runs


def test_with_the_embedded_emulator_a_pilot_killed_mid_pass_resumes_against_the_emulator(
    tmp_path: Path, sp500: Path
) -> None:
    """`--emulator`: killed after the intent of the second pass's first batch, the same pilot again settles the row
    in doubt at the embedded emulator (never at another server, here a closed port) and finishes every pair."""
    cfg = job(
        tmp_path,
        sp500,
        rows=30,
        limits="batch_size = 10\nmax_in_flight = 40\noutage_give_up_s = 5",
    )
    cfg.write_text(
        cfg.read_text() + f'knowledge = "{sp500}"\nknowledge_key = "Security"\ntime_scale = 0.001\nhard_rate = 0.3\n'
    )
    closed = {"PARALLEL_BASE_URL": "http://127.0.0.1:9"}
    args = ("pilot", str(cfg), "--emulator", "--rows", "12", "--processors", "lite,core")
    r = run_enrich(*args, env={**closed, "ENRICH_FAILPOINT": "after_intent_commit:3"})
    assert r.returncode == -9, (r.returncode, r.stderr)
    r = run_enrich(*args, env=closed)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "out.pilot.json").read_text())
    assert {p: v["runs"] for p, v in data["processors"].items()} == {"lite": 12, "core": 12}


def test_a_pilot_with_no_rows_to_research_says_so_and_sends_nothing(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """`[input] where` selects no row: exit 2 with one line, no request reached the API."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500, rows=10)
    cfg.write_text(cfg.read_text().replace("[input]\n", "[input]\nwhere = \"Symbol = 'none'\"\n", 1))
    r = run_enrich("pilot", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 2, r.stderr
    assert "nothing to pilot" in r.stderr and "Traceback" not in r.stderr
    assert emu.stats()["total_requests"] == 0


def test_a_pilot_over_the_daily_budget_left_is_refused_before_any_request(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """A first job spends $0.40 of a shared $0.60 daily budget; a second job's $0.40 pilot: exit 2, nothing sent."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    ledger = tmp_path / "ledger.sqlite"
    limits = f"batch_size = 10\nmax_in_flight = 40\ndaily_budget_usd = 0.6\nspend_ledger = {json.dumps(str(ledger))}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = job(tmp_path / "a", sp500, limits=limits), job(tmp_path / "b", sp500, limits=limits)
    args = ("--base-url", emu.base_url, "--rows", "10", "--processors", "lite,base,core")
    assert run_enrich("pilot", str(first), *args).returncode == 0
    before = len(emu.ledger())
    r = run_enrich("pilot", str(second), *args)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "exceeds the daily budget left ($0.2000 of $0.6000" in errors[0], r.stderr
    assert len(emu.ledger()) == before and not (tmp_path / "b" / "out.pilot.json").exists()


def test_plan_shows_no_pilot_forecast_once_the_gate_or_the_rows_to_research_changed(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """A pilot's forecast was made under the job's gate and `[input] where`: after either changes, plan says the
    pilot is stale instead of printing figures the evidence no longer supports."""
    emu = emulator_process("--knowledge", str(sp500), *EMU)
    cfg = job(tmp_path, sp500)
    text = cfg.read_text()
    cfg.write_text(text.replace('columns = ["Security"]', 'columns = ["Security"]\nwhere = "Symbol < \'M\'"'))
    assert run_enrich("pilot", str(cfg), "--base-url", emu.base_url, "--rows", "10").returncode == 0

    def forecast_line() -> str:
        r = run_enrich("plan", str(cfg), key=None)
        assert r.returncode == 0, r.stderr
        return next(x for x in r.stdout.splitlines() if x.startswith("pilot forecast"))

    assert "$" in forecast_line()  # unchanged config: the figures
    cfg.write_text(text)  # every row to research now, not only those before M
    assert "run `enrich pilot` again" in forecast_line() and "$" not in forecast_line()
    cfg.write_text(text.replace('columns = ["Security"]', 'columns = ["Security"]\nwhere = "Symbol < \'M\'"'))
    cfg.write_text(cfg.read_text() + '\n[gate]\naccept = ["high", "medium"]\nreview = []\nreject = ["low", "none"]\n')
    assert "run `enrich pilot` again" in forecast_line() and "$" not in forecast_line()


def test_the_accepted_interval_does_not_collapse_on_a_sample_that_happened_to_see_no_misses() -> None:
    """A 500-row file accepted 96% of the time (one field): many 30-row pilots see no miss, where a bootstrap of
    the rows is a point; the interval holds the full run's share in at least 85% of 200 pilots, narrower than 0.2."""
    rng = random.Random(3)
    population = [
        {"lite": Observation({"a": "accepted" if rng.random() < 0.96 else "rejected"}, {})} for _ in range(500)
    ]
    s = Strategy(("lite",))
    hits, width = 0, 0.0
    for t in range(200):
        idx = set(rng.sample(range(500), 30))
        sample = [population[i] for i in sorted(idx)]
        f = forecast(sample, ["a"], s, PRICES, rows_total=500, limits=LIMITS, boot=resamples(30, t, 300), seed=t)
        actual = sum(r["lite"].decisions["a"] == "accepted" for r in population) / 500
        hits += f.accepted_lo - 1e-9 <= actual <= f.accepted_hi + 1e-9
        width += (f.accepted_hi - f.accepted_lo) / 200
    assert hits >= 0.85 * 200 and width < 0.2, (hits, width)
