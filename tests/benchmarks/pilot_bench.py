"""Benchmark P9 (issue 16): quality per dollar of the strategy a pilot recommends, and how honest its forecast is.

    python -m tests.benchmarks.pilot_bench            # 10 seeds, S&P 500, --hard-rate 0.3, 50-row pilots
    BENCH_QUICK=1 python -m tests.benchmarks.pilot_bench   # 3 seeds

Per seed, on one `enrich emulator` (its own process; quality is a hash of the seed, the row and the processor, so
every job sees the same answers):

    pilot         `enrich pilot --rows 50 --seed S --target-accepted 0.9` in job A's journal
    recommended   `enrich run` of job A with the recommended strategy pasted in (it reuses the pilot's runs)
    core          job B (its own journal): core alone
    ladder        job C: the default ladder, lite > base > core on rejected

Cost is what the emulator's ledger shows each step created (the recommended strategy's includes its pilot);
accepted is the share of (row, field) cells the run report counts accepted. The forecast is checked against the
recommended run: its cost against the pilot's 90% interval of what the full run still pays, its accepted share
against the interval of the output's accepted share, both as the pilot reports it (corrected for the selection of
the strategy) and uncorrected (`uncorrected`: the same pilots' figures before that correction). Figures go to
stdout and tests/benchmarks/pilot.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "tests" / "benchmarks" / "work" / "pilot"
RESULTS = ROOT / "tests" / "benchmarks" / "pilot.json"
SP500 = ROOT.parent / "shared" / "datasets" / "sp500_constituents.csv"
PY = sys.executable
FIELDS = ("headquarters_location", "gics_sector", "founded")
HARD_RATE = 0.3
PILOT_ROWS = 50
TARGET = 0.9


class Emulator:
    def __init__(self, *args: str):
        WORK.mkdir(parents=True, exist_ok=True)
        self.log = WORK / f"emulator-{time.monotonic_ns()}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([PY, "-m", "enrich", "emulator", "--port", "0", *args], stderr=err, cwd=ROOT)
        for _ in range(1500):
            text = self.log.read_text()
            if "listening on" in text:
                self.url = text.split("listening on ")[1].split()[0]
                return
            time.sleep(0.02)
        raise RuntimeError("emulator did not start")

    def spent_micros(self) -> int:
        return sum(r["price_micros"] for r in httpx.get(self.url + "/_emulator/ledger", timeout=120).json())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.unlink(missing_ok=True)


def job(name: str, processor: str, ladder: list[str] | None = None, on: list[str] | None = None) -> Path:
    """The S&P 500 job (three fields, researched from `Security`) in its own folder, with a strategy."""
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    outputs = "".join(f'[task.output.{f}]\ntype = "string"\n' for f in FIELDS)
    escalate = (
        f"[escalate]\nprocessors = {json.dumps(ladder)}\non = {json.dumps(on or ['rejected'])}\n" if ladder else ""
    )
    cfg = d / "job.toml"
    cfg.write_text(
        f'[input]\npath = "{SP500}"\nkey = ["Symbol"]\ncolumns = ["Security"]\n'
        f'[task]\nprocessor = "{processor}"\ninstruction = "Research the company."\n{outputs}'
        f'{escalate}[output]\npath = "{d / "out.csv"}"\n[limits]\nmax_in_flight = 600\n'
    )
    return cfg


def with_strategy(cfg: Path, ladder: list[str], on: list[str]) -> None:
    """Paste a strategy into a job's config, as a user pastes the pilot's snippet."""
    text = cfg.read_text().replace('processor = "lite"', f'processor = "{ladder[0]}"', 1)
    if len(ladder) > 1:
        text += f"[escalate]\nprocessors = {json.dumps(ladder[1:])}\non = {json.dumps(on)}\n"
    cfg.write_text(text)


def enrich(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PARALLEL_API_KEY": "bench-key"}
    r = subprocess.run([PY, "-m", "enrich", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"enrich {args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def accepted_share(cfg: Path) -> float:
    report = json.loads((cfg.parent / "out.csv.report.json").read_text())
    counts = report["decision_counts"]
    cells = sum(sum(counts[f"{f}__decision"].values()) for f in FIELDS)
    return sum(counts[f"{f}__decision"].get("accepted", 0) for f in FIELDS) / cells


def one_seed(seed: int) -> dict[str, Any]:
    emu = Emulator(
        "--knowledge", str(SP500), "--knowledge-key", "Security", "--time-scale", "0.001",
        "--hard-rate", str(HARD_RATE), "--seed", str(seed),
    )  # fmt: skip
    try:
        out: dict[str, Any] = {"seed": seed}
        a = job(f"s{seed}-recommended", "lite")
        t0, before = time.monotonic(), emu.spent_micros()
        r = enrich(
            "pilot", str(a), "--base-url", emu.url, "--rows", str(PILOT_ROWS), "--seed", str(seed),
            "--processors", "lite,base,core", "--target-accepted", str(TARGET), "--json",
        )  # fmt: skip
        data = json.loads(r.stdout)
        pilot_cost = (emu.spent_micros() - before) / 1e6
        rec = next(s for s in data["strategies"] if s["recommended"])
        out["pilot"] = {"cost_usd": pilot_cost, "wall_s": round(time.monotonic() - t0, 2), "recommended": rec["name"]}
        with_strategy(a, rec["ladder"], rec["on"])
        before = emu.spent_micros()
        enrich("run", str(a), "--base-url", emu.url)
        run_cost = (emu.spent_micros() - before) / 1e6
        acc = accepted_share(a)
        lo, hi = rec["to_pay_interval_usd"]
        alo, ahi = rec["accepted_interval"]
        out["recommended"] = {
            "strategy": rec["name"],
            "run_cost_usd": run_cost,
            "cost_usd": pilot_cost + run_cost,
            "accepted": acc,
            "forecast_to_pay_usd": rec["to_pay_usd"],
            "forecast_to_pay_interval_usd": [lo, hi],
            "forecast_accepted": rec["accepted"],
            "forecast_accepted_interval": [alo, ahi],
            "cost_hit": lo <= run_cost <= hi,
            "accepted_hit": alo <= acc <= ahi,
            "selection_optimism": rec["selection_optimism"],
            "cost_optimism_usd_per_row": data["selection"]["recommended"]["cost_usd"],
        }
        raw, (ulo, uhi) = rec["accepted_uncorrected"], rec["accepted_interval_uncorrected"] or (alo, ahi)
        raw = rec["accepted"] if raw is None else raw
        out["recommended"].update(
            forecast_accepted_uncorrected=raw, forecast_accepted_interval_uncorrected=[ulo, uhi],
            accepted_hit_uncorrected=ulo <= acc <= uhi,
        )  # fmt: skip
        for name, cfg in (
            ("core", job(f"s{seed}-core", "core")),
            ("ladder", job(f"s{seed}-ladder", "lite", ["base", "core"], ["rejected"])),
        ):
            before = emu.spent_micros()
            enrich("run", str(cfg), "--base-url", emu.url)
            out[name] = {"cost_usd": (emu.spent_micros() - before) / 1e6, "accepted": accepted_share(cfg)}
        for name in ("recommended", "ladder"):
            out[name]["cost_vs_core"] = out[name]["cost_usd"] / out["core"]["cost_usd"]
            out[name]["accepted_vs_core"] = out[name]["accepted"] / out["core"]["accepted"]
        return out
    finally:
        emu.stop()


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def scenario_p9(seeds: int = 10) -> dict[str, Any]:
    """P9 over `seeds` seeds: per seed the figures of `one_seed`, then the means, the forecast's hit rates, mean
    absolute errors and mean interval widths."""
    if not SP500.exists():
        return {"error": f"{SP500} is absent"}
    per = [one_seed(s) for s in range(seeds)]
    rec = [p["recommended"] for p in per]
    summary = {
        "seeds": seeds,
        "pilot_rows": PILOT_ROWS,
        "hard_rate": HARD_RATE,
        "target_accepted": TARGET,
        "recommended_strategies": sorted({r["strategy"] for r in rec}),
        "recommended_cost_vs_core": _mean([r["cost_vs_core"] for r in rec]),
        "recommended_accepted_vs_core": _mean([r["accepted_vs_core"] for r in rec]),
        "ladder_cost_vs_core": _mean([p["ladder"]["cost_vs_core"] for p in per]),
        "ladder_accepted_vs_core": _mean([p["ladder"]["accepted_vs_core"] for p in per]),
        "core_cost_usd": _mean([p["core"]["cost_usd"] for p in per]),
        "core_accepted": _mean([p["core"]["accepted"] for p in per]),
        "pilot_cost_usd": _mean([p["pilot"]["cost_usd"] for p in per]),
        "cost_hit_rate": _mean([float(r["cost_hit"]) for r in rec]),
        "accepted_hit_rate": _mean([float(r["accepted_hit"]) for r in rec]),
        "cost_mae_usd": _mean([abs(r["forecast_to_pay_usd"] - r["run_cost_usd"]) for r in rec]),
        "cost_interval_width_usd": _mean([r["forecast_to_pay_interval_usd"][1] - r["forecast_to_pay_interval_usd"][0] for r in rec]),
        "accepted_mae": _mean([abs(r["forecast_accepted"] - r["accepted"]) for r in rec]),
        "accepted_interval_width": _mean([r["forecast_accepted_interval"][1] - r["forecast_accepted_interval"][0] for r in rec]),
        "accepted_signed_error": _mean([r["forecast_accepted"] - r["accepted"] for r in rec]),
        "cost_signed_error_usd": _mean([r["forecast_to_pay_usd"] - r["run_cost_usd"] for r in rec]),
        "selection_optimism": _mean([r["selection_optimism"] for r in rec]),
        "uncorrected": {
            "accepted_hit_rate": _mean([float(r["accepted_hit_uncorrected"]) for r in rec]),
            "accepted_mae": _mean([abs(r["forecast_accepted_uncorrected"] - r["accepted"]) for r in rec]),
            "accepted_signed_error": _mean([r["forecast_accepted_uncorrected"] - r["accepted"] for r in rec]),
            "accepted_interval_width": _mean([r["forecast_accepted_interval_uncorrected"][1] - r["forecast_accepted_interval_uncorrected"][0] for r in rec]),
        },
    }  # fmt: skip
    return {**summary, "per_seed": per}


def table(p: dict[str, Any]) -> str:
    rows = [
        ("cost / core's cost (recommended, pilot included)", p["recommended_cost_vs_core"], "<= 0.70"),
        ("accepted / core's accepted (recommended)", p["recommended_accepted_vs_core"], ">= 0.95"),
        ("cost / core's cost (default ladder on rejected)", p["ladder_cost_vs_core"], ""),
        ("accepted / core's accepted (default ladder)", p["ladder_accepted_vs_core"], ""),
        ("forecast hit rate: full-run cost in its 90% interval", p["cost_hit_rate"], "most seeds"),
        ("forecast hit rate: accepted share in its 90% interval", p["accepted_hit_rate"], "most seeds"),
        ("cost MAE USD (mean interval width beside)", p["cost_mae_usd"], f"width {p['cost_interval_width_usd']:.3f}"),
        ("accepted MAE (mean interval width beside)", p["accepted_mae"], f"width {p['accepted_interval_width']:.3f}"),
    ]
    lines = [f"| P9 ({p['seeds']} seeds) | value | goal |", "|---|---|---|"]
    lines += [f"| {m} | {v:.3f} | {g} |" for m, v, g in rows]
    return "\n".join(lines)


def main() -> None:
    result = scenario_p9(3 if os.environ.get("BENCH_QUICK") == "1" else 10)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(table(result) if "error" not in result else result["error"])


if __name__ == "__main__":
    main()
