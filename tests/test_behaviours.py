"""The S&P job under every server behaviour the published API allows (emulator --behaviours).

Each behaviour alone at small scale runs in `make test`; all of them together on the full 503
rows, with several seeds, run in `make chaos`. Every time: every row exactly once and in input
order, each with its own facts (never another row's), failed/cancelled runs reported as such,
0 duplicate runs in the emulator's ledger, and the job finished within the liveness bound
(a watchdog, never `row_timeout_s`). Rows whose run waits for an action (`action`) end the job
as `action_required`; once the emulator's account owner acts, the next run collects them without
paying again.

The focused tests below play one behaviour at a rate that shows its defect every time (the
emulator runs in this process, so a test may turn a behaviour's knob in `behaviours.py`).
"""

from __future__ import annotations

import csv
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from enrich.config import load_config
from enrich.emulator import behaviours as bh
from enrich.emulator.behaviours import BEHAVIOURS
from enrich.job import EXIT_FAILED_ROWS, EXIT_OK, JobResult, run_job
from tests.conftest import with_watchdog, write_config

LIVENESS_S = 120  # a whole small job, including the liveness bound after its last run finished
HELD_ERROR = f"run action_required: {bh.ACTION_MESSAGE}"


def sp_rows(sp500: Path, n: int | None, dest: Path) -> tuple[Path, dict[str, str]]:
    with sp500.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with dest.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest, {r["Symbol"]: r["Headquarters Location"] for r in rows}


def output(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def ledger(emu: Any) -> list[dict[str, Any]]:
    return httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json()


class Job:
    """One S&P job against one emulator; `run()` runs it to its end under the liveness watchdog."""

    def __init__(self, tmp_path: Path, src: Path, emu: Any, limits: str, what: str):
        cfg_path = write_config(
            tmp_path / "job.toml",
            input_path=src,
            output=tmp_path / "out.csv",
            key=["Symbol"],
            columns=["Security"],
            limits=limits,
        )
        self.cfg = load_config(cfg_path, {"api.base_url": emu.base_url})
        self.what = what

    def run(self, watchdog_s: float = LIVENESS_S) -> JobResult:
        return with_watchdog(
            lambda: run_job(self.cfg, api_key="sk-test-key-1234", install_signals=False),
            watchdog_s,
            f"the job under {self.what!r}",
        )


def check_output(tmp_path: Path, truth: dict[str, str], emu: Any, result: JobResult) -> Counter[str]:
    """Every row once, in order, its own facts; failed/cancelled runs said so; 0 duplicate runs."""
    out = output(tmp_path)
    assert [r["Symbol"] for r in out] == list(truth)  # every row once, in order
    statuses = Counter(r["_enrich_status"] for r in out)
    assert set(statuses) <= {"completed", "failed"}, statuses
    for r in out:
        if r["_enrich_status"] == "completed":
            assert r["headquarters_location"] == truth[r["Symbol"]], r["Symbol"]  # its own facts
        else:
            assert r["_enrich_error"].startswith(("run failed", "run cancelled")), r["_enrich_error"]
    paid = ledger(emu)
    per_row = Counter(e["metadata"]["enrich_row"] for e in paid)
    assert len(paid) == len(truth) and max(per_row.values()) == 1  # 0 duplicate runs
    assert result.exit_code == (EXIT_FAILED_ROWS if statuses.get("failed") else EXIT_OK), result.message
    return statuses


def run_under(
    tmp_path: Path,
    sp500: Path,
    emulator: Any,
    behaviours: str,
    seed: int,
    n: int | None,
    limits: str = "batch_size = 40\nrecheck_s = 2",
) -> int:
    """The job under `behaviours`; rows left `action_required` are acted on and collected by a second run.
    Returns how many rows waited for an action."""
    src, truth = sp_rows(sp500, n, tmp_path / "sp.csv")
    emu = emulator(knowledge=str(src), knowledge_key="Security", behaviours=behaviours, seed=seed, time_scale=0.002)
    job = Job(tmp_path, src, emu, limits, behaviours)
    result = job.run()
    held = [r for r in output(tmp_path) if r["_enrich_status"] == "action_required"]
    if held:  # the job ended instead of waiting for them, and says why
        assert result.exit_code == EXIT_FAILED_ROWS, result.message
        assert {r["_enrich_error"] for r in held} == {HELD_ERROR}
        assert all(r["_enrich_run_id"] for r in held)
        paid = len(ledger(emu))
        httpx.post(emu.base_url + "/_emulator/act", timeout=30)
        result = job.run()  # checks them again before anything is resubmitted
        assert len(ledger(emu)) == paid
    check_output(tmp_path, truth, emu, result)
    return len(held)


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_each_behaviour_alone(behaviour: str, tmp_path: Path, sp500: Path, emulator) -> None:
    """60 S&P rows under one behaviour: own facts, in order, once each, within the liveness bound."""
    run_under(tmp_path, sp500, emulator, behaviour, seed=1, n=60)


def test_a_listing_cut_by_an_error_event_never_proves_a_run_missing(
    tmp_path: Path, sp500: Path, emulator, monkeypatch
) -> None:
    """One row, its add-runs reply lost after the run was created, listings ending in an `error` event
    before they show it: the row is not paid again, and a later clean listing adopts its run."""
    monkeypatch.setattr(bh, "LOST_P", 1.0)
    monkeypatch.setattr(bh, "LISTING_ERROR_P", 1.0)
    monkeypatch.setattr(bh, "LISTING_ERROR_AT", (0.0, 0.0))
    src, truth = sp_rows(sp500, 1, tmp_path / "sp.csv")
    emu = emulator(knowledge=str(src), knowledge_key="Security", behaviours="lost,errors", seed=1)
    stop = threading.Event()

    def clean_listings_after_four() -> None:  # more than the two confirming listings a release needs
        while not stop.wait(0.05):
            stats = httpx.get(emu.base_url + "/_emulator/stats", timeout=30).json()
            if sum(stats["requests"].get("GET group_runs", {}).values()) >= 4:
                bh.LISTING_ERROR_P = 0.0
                return

    watcher = threading.Thread(target=clean_listings_after_four, daemon=True)
    watcher.start()
    try:
        result = Job(tmp_path, src, emu, "recheck_s = 1", "lost,errors").run()
    finally:
        stop.set()
        watcher.join()
    assert check_output(tmp_path, truth, emu, result) == {"completed": 1}


def test_results_without_metadata_are_matched_by_run_id(tmp_path: Path, sp500: Path, emulator) -> None:
    """`/result` and GET run often without `metadata` (small batches: results come one by one): every
    row is still recorded on its own row, once, and the job ends within the liveness bound."""
    assert run_under(tmp_path, sp500, emulator, "nometa", seed=2, n=40, limits="batch_size = 4\nrecheck_s = 1") == 0


def test_an_expired_cursor_is_dropped_and_the_group_listed_from_the_start(
    tmp_path: Path, sp500: Path, emulator, monkeypatch
) -> None:
    """Cursors expire within a second (422): the job carries on without them, and so does a resume whose
    stored events cursor expired long ago."""
    monkeypatch.setattr(bh, "CURSOR_TTL_S", 0.3)
    src, truth = sp_rows(sp500, 60, tmp_path / "sp.csv")
    emu = emulator(knowledge=str(src), knowledge_key="Security", behaviours="expiry", seed=3, time_scale=0.002)
    first, _ = sp_rows(sp500, 30, tmp_path / "sp.csv")  # the first 30 rows now, all 60 on the resume
    job = Job(tmp_path, first, emu, "batch_size = 7\nrecheck_s = 1", "expiry")
    assert job.run().exit_code == EXIT_OK
    sp_rows(sp500, 60, tmp_path / "sp.csv")
    check_output(tmp_path, truth, emu, job.run())
    expired = httpx.get(emu.base_url + "/_emulator/stats", timeout=30).json()["requests"]
    assert expired["GET group_events"].get("422", 0) + expired.get("GET group_runs", {}).get("422", 0) >= 1


def test_runs_waiting_for_action_end_the_job_and_are_checked_again(
    tmp_path: Path, sp500: Path, emulator, monkeypatch
) -> None:
    """Runs stuck in `action_required` (not active): the job ends within the liveness bound with those rows
    `action_required` and the API's message (exit 3); after the owner acts, the next run collects them
    without a new run."""
    monkeypatch.setattr(bh, "ACTION_P", 0.2)
    assert run_under(tmp_path, sp500, emulator, "action", seed=4, n=60) > 0


def test_metadata_echoed_as_other_json_types(tmp_path: Path, sp500: Path, emulator) -> None:
    """`enrich_try` echoed as 1.0 or "1.0": attributed all the same, never paid twice."""
    run_under(tmp_path, sp500, emulator, "echo", seed=5, n=60, limits="batch_size = 8\nrecheck_s = 1")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_all_behaviours_together_on_sp500(seed: int, tmp_path: Path, sp500: Path, emulator) -> None:
    """All 503 S&P rows with every behaviour switched on at once, for several seeds."""
    run_under(tmp_path, sp500, emulator, "all", seed=seed, n=None)
