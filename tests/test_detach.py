"""--detach then collect (long pro/ultra jobs), and `enrich status` while a job is live."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

from tests.conftest import CANARY_KEY, ROOT, run_enrich, wait_for, write_config

VOLATILE = ["_enrich_run_id", "_enrich_latency_s"]


def test_detach_then_collect_equals_one_run(tmp_path: Path, emulator_process) -> None:
    """--detach submits every row and exits 0; the same command later collects: same output, 0 extra runs."""
    emu = emulator_process("--time-scale", "0.02")
    src = ROOT / "data/companies.csv"
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company", "website"],
        limits="max_in_flight = 10",
    )
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, "--detach")
    assert r.returncode == 0 and "detached: 55 runs" in r.stderr, r.stderr
    assert len(emu.ledger()) == 55  # every row sent although max_in_flight is 10: nothing waits on them
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 55
    one = write_config(
        tmp_path / "one.toml",
        input_path=src,
        output=tmp_path / "one.csv",
        key=["company"],
        columns=["company", "website"],
    )
    assert run_enrich("run", str(one), "--base-url", emu.base_url).returncode == 0
    a = pl.read_csv(tmp_path / "out.csv", infer_schema=False).drop(VOLATILE)
    b = pl.read_csv(tmp_path / "one.csv", infer_schema=False).drop(VOLATILE)
    assert a.equals(b)


def test_status_shows_what_a_live_job_waits_on(tmp_path: Path, emulator_process) -> None:
    """While a run is live, status names its pid, active runs (never above the cap) and what it waits on."""
    emu = emulator_process("--time-scale", "0.3")
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=ROOT / "data/companies.csv",
        output=tmp_path / "o.csv",
        key=["company"],
        columns=["company"],
        limits="max_in_flight = 5",
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PARALLEL_")}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        journal = tmp_path / "o.csv.journal.sqlite"

        def live() -> dict | None:
            if not journal.exists():
                return None
            r = run_enrich("status", str(journal), "--json")
            return json.loads(r.stdout)["live"] if r.returncode == 0 else None

        info = wait_for(live, timeout=60, interval=0.3)
        assert info["pid"] == proc.pid and info["cap"] == 5 and info["active_runs"] <= 5
        text = run_enrich("status", str(journal)).stdout
        assert "live" in text and "cap 5" in text
    finally:
        proc.kill()
        proc.wait()
    text = run_enrich("status", str(tmp_path / "o.csv.journal.sqlite")).stdout
    assert "no enrich process is running" in text
