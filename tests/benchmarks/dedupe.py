"""Benchmark of paying once (issue 18): a duplicate-heavy input with dedupe on, then off, then a second job.

    python -m tests.benchmarks.dedupe            # 20,000 rows of 2,000 distinct companies (each 10 times)
    BENCH_QUICK=1 python -m tests.benchmarks.dedupe   # 2,000 rows of 200

Each case runs `enrich run` (its own process) against `enrich emulator` (its own process, zero latency,
limits off), and counts what was paid for in the emulator's ledger:

    dedupe on     rows, runs created, dollars, wall and client CPU
    dedupe off    the same input with `[input] dedupe = false`: a run per row
    cache         a second job (another output and journal) over the same rows with the first job's
                  `[cache] path`: runs it still creates (0 expected), rows served from the cache

Figures go to stdout as a table and to tests/benchmarks/dedupe.json. Machines are shared and noisy:
runs and dollars are exact, seconds are not.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "tests" / "benchmarks" / "work" / "dedupe"
RESULTS = ROOT / "tests" / "benchmarks" / "dedupe.json"
PY = sys.executable


def make_input(rows: int, distinct: int, seed: int = 18) -> Path:
    """`rows` rows over `distinct` companies, each under its own key, in a shuffled order; `note` is not sent."""
    path = WORK / f"dups_{rows}_{distinct}.csv"
    order = [i % distinct for i in range(rows)]
    random.Random(seed).shuffle(order)
    with path.open("w") as f:
        f.write("id,company,website,note\n")
        for n, i in enumerate(order):
            f.write(f"r{n},Company {i},https://c{i}.example,copy {n}\n")
    return path


def config(src: Path, name: str, dedupe: bool, cache: Path | None) -> Path:
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cfg = d / "job.toml"
    cfg.write_text(
        f"""[input]
path = "{src}"
key = ["id"]
columns = ["company", "website"]
dedupe = {"true" if dedupe else "false"}
[task]
processor = "lite-fast"
instruction = "Research the company."
[task.output.headquarters_location]
type = "string"
[output]
path = "{d / "out.parquet"}"
[limits]
max_in_flight = 5000
requests_per_minute = 100000
"""
        + (f'[cache]\npath = "{cache}"\n' if cache else "")
    )
    return cfg


def start_emulator() -> tuple[subprocess.Popen[bytes], str]:
    log = WORK / f"emulator-{time.monotonic_ns()}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [PY, "-m", "enrich", "emulator", "--port", "0", "--time-scale", "0", "--rate-limit", "0"],
            stderr=err,
            cwd=ROOT,
        )
    for _ in range(1500):
        text = log.read_text()
        if "listening on" in text:
            return proc, text.split("listening on ")[1].split()[0]
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("emulator did not start")


def run(cfg: Path, url: str) -> dict[str, Any]:
    """One `enrich run`: the runs and dollars it added to the ledger, wall time, client CPU, its report's reuse."""
    before = httpx.get(url + "/_emulator/ledger", timeout=120).json()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    env = {**os.environ, "PARALLEL_API_KEY": "bench-key"}
    r = subprocess.run(
        [PY, "-m", "enrich", "run", str(cfg), "--base-url", url], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"enrich failed ({r.returncode}): {r.stderr[-2000:]}")
    after = httpx.get(url + "/_emulator/ledger", timeout=120).json()
    new = after[len(before) :]
    report = json.loads((cfg.parent / "out.parquet.report.json").read_text())
    return {
        "rows": report["rows"],
        "completed": report["status_counts"].get("completed", 0),
        "runs": len(new),
        "usd": round(sum(x["price_micros"] for x in new) / 1e6, 6),
        "wall_s": round(wall, 2),
        "cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 2),
        "reuse": report.get("reuse", {}),
    }


def measure(rows: int = 20_000, distinct: int = 2_000) -> dict[str, Any]:
    """Runs and dollars of one duplicate-heavy input: dedupe on, dedupe off, and a second job on the first's cache."""
    WORK.mkdir(parents=True, exist_ok=True)
    src = make_input(rows, distinct)
    cache = WORK / "results.sqlite"
    for p in WORK.glob("results.sqlite*"):
        p.unlink()
    proc, url = start_emulator()
    try:
        on = run(config(src, "on", True, cache), url)
        off = run(config(src, "off", False, None), url)
        again = run(config(src, "cache", True, cache), url)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"rows": rows, "distinct_inputs": distinct, "dedupe_on": on, "dedupe_off": off, "second_job_cache": again}


def main() -> None:
    quick = bool(os.environ.get("BENCH_QUICK"))
    rows, distinct = (2_000, 200) if quick else (20_000, 2_000)
    out = measure(rows, distinct)
    on, off, again = out["dedupe_on"], out["dedupe_off"], out["second_job_cache"]
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"duplicate-heavy input: {rows:,} rows of {distinct:,} distinct inputs (each {rows // distinct} times)")
    print(f"{'case':<26} {'rows':>8} {'runs':>8} {'rows/run':>9} {'dollars':>9} {'wall s':>8} {'cpu s':>7}")
    for name, r in (("dedupe on", on), ("dedupe off", off), ("second job, same cache", again)):
        per = f"{r['rows'] / r['runs']:.1f}" if r["runs"] else "-"
        print(
            f"{name:<26} {r['rows']:>8,} {r['runs']:>8,} {per:>9} {r['usd']:>9.2f} {r['wall_s']:>8.1f} {r['cpu_s']:>7.1f}"
        )
    saved = off["usd"] - on["usd"]
    print(
        f"dedupe saves ${saved:.2f} of ${off['usd']:.2f} ({saved / off['usd']:.0%}); the second job pays ${again['usd']:.2f}"
    )


if __name__ == "__main__":
    main()
