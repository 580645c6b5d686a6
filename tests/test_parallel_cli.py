"""Parallel's own `parallel-cli` (parallel-web-tools), unchanged, against the emulator."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("parallel_web_tools", reason="parallel-web-tools (a dev dependency) is not installed")


def test_parallel_cli_enrich_run(tmp_path: Path, emulator) -> None:
    """`parallel-cli enrich run` creates a group, adds runs, polls and writes answers from the knowledge table."""
    emu = emulator(time_scale=0.001)
    src = tmp_path / "in.csv"
    src.write_text("company\n3M\nApple\nNVIDIA\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    exe = str(Path(sys.executable).parent / "parallel-cli")
    if not Path(exe).exists():
        exe = shutil.which("parallel-cli") or exe
    env = {
        **os.environ,
        "PARALLEL_API_KEY": "cli-key",
        "PARALLEL_API_URL": emu.base_url,
        "PARALLEL_BASE_URL": emu.base_url,
    }
    r = subprocess.run(
        [
            exe,
            "enrich",
            "run",
            "--source-type",
            "csv",
            "--source",
            str(src),
            "--target",
            str(out),
            "--source-columns",
            '[{"name": "company", "description": "Company name"}]',
            "--enriched-columns",
            '[{"name": "headquarters_location", "description": "HQ city"}]',
            "--processor",
            "lite-fast",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    with out.open(encoding="utf-8", newline="") as f:
        rows = {row["company"]: row for row in csv.DictReader(f)}
    assert rows["3M"]["headquarters_location"] == "Saint Paul, Minnesota, United States"
    assert rows["NVIDIA"]["headquarters_location"].startswith("Santa Clara")
    ledger = emu.emulator.ledger_json()
    assert len(ledger) == 3 and all(x["taskgroup_id"] for x in ledger)
