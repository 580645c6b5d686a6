"""The S&P job under every server behaviour the published API allows (emulator --behaviours).

Each behaviour alone at small scale runs in `make test`; all of them together on the full 503
rows, with several seeds, run in `make chaos`. Every time: every row exactly once and in input
order, each with its own facts (never another row's), failed/cancelled runs reported as such,
0 duplicate runs in the emulator's ledger, and the job finished within the liveness bound
(a watchdog, never `row_timeout_s`).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from enrich.config import load_config
from enrich.job import EXIT_FAILED_ROWS, EXIT_OK, run_job
from tests.conftest import with_watchdog, write_config

BEHAVIOURS = ("cut", "snapshots", "eventual", "shuffle", "framing", "basis", "connections", "endings")
LIVENESS_S = 120  # a whole small job, including the liveness bound after its last run finished


def sp_rows(sp500: Path, n: int | None, dest: Path) -> tuple[Path, dict[str, str]]:
    with sp500.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with dest.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest, {r["Symbol"]: r["Headquarters Location"] for r in rows}


def run_under(tmp_path: Path, sp500: Path, emulator: Any, behaviours: str, seed: int, n: int | None) -> None:
    src, truth = sp_rows(sp500, n, tmp_path / "sp.csv")
    emu = emulator(knowledge=str(src), knowledge_key="Security", behaviours=behaviours, seed=seed, time_scale=0.002)
    cfg_path = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["Symbol"],
        columns=["Security"],
        limits="batch_size = 40\nrecheck_s = 2",
    )
    cfg = load_config(cfg_path, {"api.base_url": emu.base_url})
    result = with_watchdog(
        lambda: run_job(cfg, api_key="sk-test-key-1234", install_signals=False),
        LIVENESS_S,
        f"the job under {behaviours!r}",
    )
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as f:
        out = list(csv.DictReader(f))
    assert [r["Symbol"] for r in out] == list(truth)  # every row once, in order
    statuses = Counter(r["_enrich_status"] for r in out)
    assert set(statuses) <= {"completed", "failed"}, statuses
    for r in out:
        if r["_enrich_status"] == "completed":
            assert r["headquarters_location"] == truth[r["Symbol"]], r["Symbol"]  # its own facts
        else:
            assert r["_enrich_error"].startswith(("run failed", "run cancelled")), r["_enrich_error"]
    ledger = httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json()
    per_row = Counter((e["metadata"]["enrich_row"], e["metadata"]["enrich_try"]) for e in ledger)
    assert len(ledger) == len(truth) and max(per_row.values()) == 1  # 0 duplicate runs
    assert result.exit_code == (EXIT_FAILED_ROWS if statuses.get("failed") else EXIT_OK), result.message


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_each_behaviour_alone(behaviour: str, tmp_path: Path, sp500: Path, emulator) -> None:
    """60 S&P rows under one behaviour: own facts, in order, once each, within the liveness bound."""
    run_under(tmp_path, sp500, emulator, behaviour, seed=1, n=60)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_all_behaviours_together_on_sp500(seed: int, tmp_path: Path, sp500: Path, emulator) -> None:
    """All 503 S&P rows with every behaviour switched on at once, for several seeds."""
    run_under(tmp_path, sp500, emulator, "all", seed=seed, n=None)
