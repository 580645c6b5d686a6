"""The journal's two modes side by side: rows/s of one zero-latency emulator job, WAL (local) vs network.

    .venv/bin/python -m tests.benchmarks.journal_modes            # 20,000 rows, 3 runs per mode
    JOURNAL_BENCH_ROWS=5000 JOURNAL_BENCH_REPEATS=1 .venv/bin/python -m tests.benchmarks.journal_modes

One `enrich emulator` (no latency, no rate limit) serves every run; the runs alternate between the modes
(`--journal-mode local` / `network`) so both see the same machine noise, on the same local disk (these
machines cannot mount NFS: on a real network file system every fsync is a round trip and the gap is wider).
Rows/s is the job's own `elapsed_s` from its report (the CLI's start-up is not the journal's cost); the
median of the repeats is reported with the ratio network / local. Prints one JSON object on stdout;
`measure()` returns it for `make bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "tests" / "benchmarks" / "work" / "journal_modes"
PY = sys.executable
MODES = ("local", "network")


def _emulator() -> tuple[subprocess.Popen[bytes], str]:
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "emulator.log"
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


def _job(rows: int) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / f"companies_{rows}.csv"
    if not src.exists():
        src.write_text("company,website\n" + "".join(f"Company {i},https://c{i}.example\n" for i in range(rows)))
    cfg = WORK / "job.toml"
    cfg.write_text(
        f"""[input]
path = "{src}"
key = ["company"]
columns = ["company"]
[task]
processor = "lite-fast"
instruction = "Research the company."
[task.output.headquarters_location]
type = "string"
[output]
path = "{WORK / "out" / "out.parquet"}"
[limits]
max_in_flight = 500
requests_per_minute = 1800
"""
    )
    return cfg


def _run(cfg: Path, url: str, mode: str) -> dict[str, Any]:
    """One fresh `enrich run` in the given journal mode: its report's elapsed_s, rows and mode."""
    shutil.rmtree(WORK / "out", ignore_errors=True)
    httpx.post(url + "/_emulator/reset", timeout=60)
    env = {**os.environ, "PARALLEL_API_KEY": "bench-key"}
    t0 = time.monotonic()
    r = subprocess.run(
        [PY, "-m", "enrich", "run", str(cfg), "--base-url", url, "--journal-mode", mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"enrich failed ({r.returncode}): {r.stderr[-2000:]}")
    report = json.loads((WORK / "out" / "out.parquet.report.json").read_text())
    if report.get("journal_mode") != mode:
        raise RuntimeError(f"the run used the {report.get('journal_mode')} mode, not {mode}")
    return {"elapsed_s": report["elapsed_s"], "wall_s": wall, "rows": report["rows"]}


def measure(rows: int = 20_000, repeats: int = 3) -> dict[str, Any]:
    """rows/s per mode (median of `repeats`, runs alternating) and the ratio network / local."""
    cfg = _job(rows)
    proc, url = _emulator()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for i in range(repeats):
            for mode in MODES if i % 2 == 0 else reversed(MODES):
                runs[mode].append(_run(cfg, url, mode))
    finally:
        proc.terminate()
        proc.wait(30)
    out: dict[str, Any] = {"rows": rows, "repeats": repeats, "cpus": os.cpu_count()}
    for mode in MODES:
        rates = [r["rows"] / r["elapsed_s"] for r in runs[mode]]
        out[mode] = {
            "rows_per_s": round(statistics.median(rates), 1),
            "rows_per_s_each": [round(x, 1) for x in rates],
            "wall_s_each": [round(r["wall_s"], 2) for r in runs[mode]],
        }
    out["network_vs_local"] = round(out["network"]["rows_per_s"] / out["local"]["rows_per_s"], 3)
    return out


if __name__ == "__main__":
    result = measure(int(os.environ.get("JOURNAL_BENCH_ROWS", 20_000)), int(os.environ.get("JOURNAL_BENCH_REPEATS", 3)))
    print(json.dumps(result, indent=1))
