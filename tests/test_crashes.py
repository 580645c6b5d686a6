"""Crashes and messages (issue 15): the real CLI in its own process against the emulator, ending in one line and a
documented exit code, never a traceback."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from enrich.job import EXIT_CODES
from tests.conftest import CANARY_KEY, ROOT, run_enrich, wait_for, write_config

COMPANIES = ROOT / "data/companies.csv"
ROWS = len(COMPANIES.read_text().splitlines()) - 1


def env_with(key: str = CANARY_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    env["PARALLEL_API_KEY"] = key
    return env


def companies_job(tmp_path: Path, name: str = "o.csv", **kw: Any) -> Path:
    return write_config(
        tmp_path / "job.toml",
        input_path=COMPANIES,
        output=tmp_path / name,
        key=["company"],
        columns=["company"],
        **kw,
    )


def statuses(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return [r["_enrich_status"] for r in csv.DictReader(f)]


def status_json(journal: Path) -> dict[str, Any]:
    r = run_enrich("status", str(journal), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def enrich_in_shell(redirect: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`enrich ARGS <redirect>` through sh, as a user types it (e.g. `>&-`)."""
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-m", "enrich", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- closed or vanishing stdout / stderr ------------------------------------------------------------


def test_closed_stdout_does_not_change_the_outcome(tmp_path: Path, emulator_process) -> None:
    """`enrich run ... >&-` finishes with exit 0, every row completed, and no traceback."""
    emu = emulator_process("--time-scale", "0.01")
    cfg = companies_job(tmp_path)
    r = enrich_in_shell(">&-", "run", str(cfg), "--base-url", emu.base_url, env=env_with())
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert statuses(tmp_path / "o.csv") == ["completed"] * ROWS


def test_closed_stderr_does_not_change_the_outcome(tmp_path: Path, emulator_process) -> None:
    """`enrich run ... 2>&-` researches every row and exits 0 (progress lines had nowhere to go)."""
    emu = emulator_process("--time-scale", "0.01")
    cfg = companies_job(tmp_path)
    r = enrich_in_shell("2>&-", "run", str(cfg), "--base-url", emu.base_url, env=env_with())
    assert r.returncode == 0
    info = status_json(tmp_path / "o.csv.journal.sqlite")
    assert info["counts"] == {"done": ROWS} and info["last_error"] is None
    assert statuses(tmp_path / "o.csv") == ["completed"] * ROWS


def test_stderr_reader_gone_does_not_change_the_outcome(tmp_path: Path, emulator_process) -> None:
    """stderr into a pipe nobody reads any more (`2>&1 | head` exited, a closed terminal): exit 0, all rows done."""
    emu = emulator_process("--time-scale", "0.01")
    cfg = companies_job(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stderr now fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
            cwd=ROOT,
            env=env_with(),
            stderr=write_end,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    assert status_json(tmp_path / "o.csv.journal.sqlite")["counts"] == {"done": ROWS}


# ---- SIGHUP ------------------------------------------------------------------------------------------


def test_sighup_stops_like_sigterm_and_writes_the_output(tmp_path: Path, emulator_process) -> None:
    """SIGHUP (the terminal closed): stop submitting, write the partial output, exit 75; running again finishes."""
    emu = emulator_process("--time-scale", "0.05")
    cfg = companies_job(tmp_path, limits="batch_size = 5\nmax_in_flight = 10")
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env_with(),
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(emu.ledger()) >= 10, timeout=60)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "Traceback" not in err
    partial = statuses(tmp_path / "o.csv")
    assert len(partial) == ROWS and "pending" in partial
    again = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert again.returncode == 0, again.stderr
    assert len(emu.ledger()) == ROWS  # nothing was paid twice


def test_exit_codes_are_documented_in_the_readme() -> None:
    """Every code in job.EXIT_CODES has a row in the README's exit code table."""
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"\n| {code} | " in readme, code
