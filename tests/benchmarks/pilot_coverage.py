"""How often the pilot's 90% accepted-share (and cost) intervals hold the full run's actual figures (issue 16).

    python -m tests.benchmarks.pilot_coverage            # emulator seeds 0-4, 200 pilots of 50 rows each
    COVERAGE_SEEDS=3 COVERAGE_PILOTS=100 python -m tests.benchmarks.pilot_coverage
    COVERAGE_PILOTS=0 python -m tests.benchmarks.pilot_coverage    # only the hindsight bound below

Per emulator seed (S&P 500, `--hard-rate 0.3`, as P9), every row is researched once on each processor (lite, base,
core alone: three ordinary `enrich run`s; the emulator's quality is a hash of the seed, the row and the processor,
so a row's answer on a processor is the same in a pilot, an escalation or a run of its own). That gives the whole
population of (row, processor) decisions, saved under tests/benchmarks/work/pilot/coverage/. Then, offline, many
random 50-row pilots are drawn from it; each is forecast as `pilot.compare` does (every strategy, the recommended
one corrected for the selection) with `BOOT` resamples, and checked against the full run's actual figures computed
by replaying the strategy on every row not sampled (the sampled rows as the full run keeps them). First, per seed, the hindsight bound on P9: the cheapest
strategy that reaches 95% of core's accepted share on the whole file, and what it costs with a pilot's unused runs.
Reported then: per
seed, the hit rate and the mean width of the accepted and cost intervals, (a) for every strategy fixed in advance
(pooled over strategies) and (b) for the recommended one. Figures go to stdout and
tests/benchmarks/pilot_coverage.json.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
from pathlib import Path
from typing import Any

from enrich import pilot
from tests.benchmarks.pilot_bench import FIELDS, HARD_RATE, PILOT_ROWS, SP500, TARGET, WORK, Emulator, enrich, job

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "pilot_coverage.json"
PROCESSORS = ("lite", "base", "core")
PRICES = {"lite": 5000, "base": 10000, "core": 25000}  # micros per run, as the emulator's price list
BOOT = int(os.environ.get("COVERAGE_BOOT", "300"))
LIMITS = pilot.Limits(600, 10_000, 50)


def population(seed: int) -> list[dict[str, pilot.Observation]]:
    """Every S&P row's decision per field on each processor under emulator `seed` (cached as JSON)."""
    cache = WORK / "coverage" / f"population-s{seed}.json"
    if not cache.exists():
        emu = Emulator(
            "--knowledge", str(SP500), "--knowledge-key", "Security", "--time-scale", "0.001",
            "--hard-rate", str(HARD_RATE), "--seed", str(seed),
        )  # fmt: skip
        try:
            rows: dict[str, dict[str, dict[str, str]]] = {}
            for p in PROCESSORS:
                cfg = job(f"coverage-s{seed}-{p}", p)
                enrich("run", str(cfg), "--base-url", emu.url)
                with (cfg.parent / "out.csv").open(newline="") as fh:
                    for r in csv.DictReader(fh):
                        rows.setdefault(r["Symbol"], {})[p] = {f: r[f"{f}__decision"] or "rejected" for f in FIELDS}
        finally:
            emu.stop()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows))
    data = json.loads(cache.read_text())
    return [{p: pilot.Observation(d, {}) for p, d in procs.items()} for _k, procs in sorted(data.items())]


def actual(pop: list[dict[str, pilot.Observation]], idx: set[int], s: pilot.Strategy) -> tuple[float, float]:
    """The full run's figures for strategy `s` after a pilot on rows `idx`: what it pays (USD), its accepted share."""
    nf = len(FIELDS)
    paid = sum(pilot.replay(r, s, FIELDS, PRICES).cost_micros for i, r in enumerate(pop) if i not in idx) / 1e6
    kept = sum(
        sum(d == "accepted" for d in pilot.merged(r, s.ladder, FIELDS).values())
        if i in idx
        else pilot.replay(r, s, FIELDS, PRICES).accepted
        for i, r in enumerate(pop)
    )
    return paid, kept / (nf * len(pop))


def hindsight(seed: int) -> dict[str, Any]:
    """What the best pick could do on seed `seed`, known only after the fact: every strategy's full-file cost and
    accepted share as ratios to core alone's, and the cheapest strategy reaching 95% of core's accepted share with
    the cost a 50-row pilot on lite, base and core adds to it (the pilot's runs the strategy would not have bought:
    PILOT_ROWS x (the three prices - the strategy's mean cost per row)), as P9 counts it ("pilot included")."""
    pop = population(seed)
    core = pilot.Strategy(("core",))
    core_cost, core_acc = actual(pop, set(), core)
    per_run = sum(PRICES.values()) / 1e6
    rows = []
    for s in pilot.strategies(PROCESSORS):
        cost, acc = actual(pop, set(), s)
        unused = PILOT_ROWS * (per_run - cost / len(pop))
        rows.append(
            {"name": s.name, "cost_vs_core": cost / core_cost, "accepted_vs_core": acc / core_acc,
             "cost_vs_core_pilot_included": (cost + unused) / core_cost}
        )  # fmt: skip
    best = min((r for r in rows if r["accepted_vs_core"] >= 0.95), key=lambda r: r["cost_vs_core"])
    return {"seed": seed, "best_reaching_95": best, "strategies": rows}


def one_seed(seed: int, pilots: int) -> dict[str, Any]:
    pop = population(seed)
    strats = pilot.strategies(PROCESSORS)
    rng = random.Random(1000 + seed)
    fixed = {s.name: [0, 0, 0.0, 0.0] for s in strats}  # accepted hits, cost hits, accepted width, cost width
    rec = [0, 0, 0.0, 0.0, 0.0]  # the same, then the sum of absolute accepted errors
    for t in range(pilots):
        idx = set(rng.sample(range(len(pop)), PILOT_ROWS))
        sample = [pop[i] for i in sorted(idx)]
        boot = pilot.resamples(PILOT_ROWS, t, BOOT)
        one = functools.partial(pilot.forecast, sample, FIELDS, prices=PRICES, rows_total=len(pop), limits=LIMITS)
        fcs = [one(s, seed=t, boot=boot) for s in strats]
        acts = [actual(pop, idx, s) for s in strats]
        for s, f, (paid, acc) in zip(strats, fcs, acts, strict=True):
            c = fixed[s.name]
            c[0] += f.accepted_lo - 1e-9 <= acc <= f.accepted_hi + 1e-9
            c[1] += f.to_pay_lo - 1e-9 <= paid <= f.to_pay_hi + 1e-9
            c[2] += f.accepted_hi - f.accepted_lo
            c[3] += f.to_pay_hi - f.to_pay_lo
        i, _ = pilot.recommend(fcs, TARGET)
        opt = pilot.selection_optimism(sample, FIELDS, strats, PRICES, rows_total=len(pop), boot=boot, target=TARGET)
        f = one(strats[i], seed=t, boot=boot, optimism=opt["recommended"]["accepted"])
        paid, acc = acts[i]
        rec[0] += f.accepted_lo - 1e-9 <= acc <= f.accepted_hi + 1e-9
        rec[1] += f.to_pay_lo - 1e-9 <= paid <= f.to_pay_hi + 1e-9
        rec[2] += f.accepted_hi - f.accepted_lo
        rec[3] += f.to_pay_hi - f.to_pay_lo
        rec[4] += abs(f.accepted - acc)
    n = pilots
    pooled = [sum(c[k] for c in fixed.values()) / (n * len(strats)) for k in range(4)]
    return {
        "seed": seed,
        "pilots": n,
        "fixed": {
            "accepted_hit_rate": pooled[0], "cost_hit_rate": pooled[1],
            "accepted_width": pooled[2], "cost_width_usd": pooled[3],
            "accepted_hit_rate_by_strategy": {k: c[0] / n for k, c in fixed.items()},
        },
        "recommended": {
            "accepted_hit_rate": rec[0] / n, "cost_hit_rate": rec[1] / n,
            "accepted_width": rec[2] / n, "cost_width_usd": rec[3] / n, "accepted_mae": rec[4] / n,
        },
    }  # fmt: skip


def main() -> None:
    seeds = int(os.environ.get("COVERAGE_SEEDS", "5"))
    pilots = int(os.environ.get("COVERAGE_PILOTS", "200"))
    after = [hindsight(s) for s in range(seeds)]
    for h in after:
        b = h["best_reaching_95"]
        print(
            f"seed {h['seed']}: in hindsight the cheapest strategy with 95% of core's accepted share is {b['name']}: "
            f"{b['cost_vs_core']:.3f} of core's cost ({b['cost_vs_core_pilot_included']:.3f} with a {PILOT_ROWS}-row "
            f"pilot's unused runs) for {b['accepted_vs_core']:.3f} of its accepted share",
            flush=True,
        )
    per = [one_seed(s, pilots) for s in range(seeds)] if pilots else []
    for p in per:
        fx, rc = p["fixed"], p["recommended"]
        print(
            f"seed {p['seed']}: fixed accepted {fx['accepted_hit_rate']:.3f} (width {fx['accepted_width']:.4f}) "
            f"cost {fx['cost_hit_rate']:.3f}; recommended accepted {rc['accepted_hit_rate']:.3f} "
            f"(width {rc['accepted_width']:.4f}, MAE {rc['accepted_mae']:.4f}) cost {rc['cost_hit_rate']:.3f}",
            flush=True,
        )
    if per:
        RESULTS.write_text(
            json.dumps({"boot": BOOT, "pilot_rows": PILOT_ROWS, "per_seed": per, "hindsight": after}, indent=2)
        )


if __name__ == "__main__":
    main()
