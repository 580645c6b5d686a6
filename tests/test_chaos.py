"""Prove the promises (reliability.md section 9): crash safety at every failpoint, lost
responses, 429 storms, outages, auth/credit errors, budgets under crashes, secrets.

The process under test is a real `enrich run` (SIGKILLed by its own failpoints or by the
test); the emulator runs in its own process so its ledger survives. A fast subset runs in
`make test`; the exhaustive sweeps are marked slow (`make chaos`).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from enrich.failpoints import POINTS
from enrich.journal import Journal
from tests.conftest import CANARY_KEY, ROOT, run_enrich, wait_for, write_config

N_ROWS = 50


@pytest.fixture(scope="module")
def rows50(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "companies50.csv"
    lines = (ROOT / "data/companies.csv").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[: N_ROWS + 1]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def golden(rows50: Path, tmp_path_factory) -> pl.DataFrame:
    """The output of an uninterrupted run (run ids dropped: they differ between emulators)."""
    from tests.conftest import EmulatorProcess

    d = tmp_path_factory.mktemp("golden")
    emu = EmulatorProcess("--time-scale", "0")
    try:
        cfg = _config(d, rows50)
        assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    finally:
        emu.stop()
    return pl.read_csv(d / "out.csv", infer_schema=False).drop("_enrich_run_id", "_enrich_latency_s")


def _config(d: Path, src: Path, limits: str = "", out: str = "out.csv", journal_mode: str = "auto") -> Path:
    return write_config(
        d / "job.toml",
        input_path=src,
        output=d / out,
        key=["company"],
        columns=["company", "website"],
        fields={"headquarters_location": "string", "founded_year": "integer"},
        limits=(limits or "batch_size = 10\nmax_in_flight = 20") + f'\njournal_mode = "{journal_mode}"',
    )


def assert_journal_mode(journal: Path, mode: str) -> None:
    """The journal is in the mode its job was run in, and the network mode never leaves a WAL file beside it."""
    view = Journal.open(journal, readonly=True)
    try:
        assert view.sqlite_mode() == ("delete" if mode == "network" else "wal")
    finally:
        view.close()
    if mode == "network":
        assert not [p for p in journal.parent.iterdir() if p.name.endswith(("-wal", "-shm"))]


def _env(failpoint: str | None = None) -> dict[str, str]:
    return {"ENRICH_FAILPOINT": failpoint} if failpoint else {}


def check_oracle(d: Path, emu, golden: pl.DataFrame | None, budget_usd: float | None = None) -> None:
    """Every key once, no duplicate runs, no row in doubt, journal intact, output = golden, no secret."""
    out = pl.read_csv(d / "out.csv", infer_schema=False)
    assert out["company"].n_unique() == out.height
    ledger = emu.ledger()
    refs = Counter(r["metadata"]["enrich_row"] for r in ledger)
    assert max(refs.values(), default=0) == 1, f"duplicate paid runs: {[k for k, v in refs.items() if v > 1]}"
    j = Journal.open(d / "out.csv.journal.sqlite", readonly=True)
    try:
        assert j.integrity_ok()
        counts = j.counts()
        assert not any(counts.get(s) for s in ("intent", "unknown", "submitted")), counts
        spent = j.spent_micros()
    finally:
        j.close()
    cost = sum(r["price_micros"] for r in ledger)
    assert spent == cost, (spent, cost)
    if budget_usd is not None:
        assert cost <= budget_usd * 1e6
    if golden is not None:
        assert out.drop("_enrich_run_id", "_enrich_latency_s").equals(golden)
    assert_no_canary(d)


def assert_no_canary(d: Path) -> None:
    for path in d.rglob("*"):
        if path.is_file():
            assert CANARY_KEY.encode() not in path.read_bytes(), f"API key found in {path}"


def kill_at_random(cfg: Path, emu, kills: int, seed: int, lo: float, hi: float, after_each=None) -> None:
    """Start `enrich run` and SIGKILL it at a random moment, `kills` times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    rng = random.Random(seed)
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(lo, hi))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if after_each is not None:
            after_each()


def resume_until_done(cfg: Path, emu, tries: int = 5, **env: str) -> subprocess.CompletedProcess[str]:
    for _ in range(tries):
        r = run_enrich("run", str(cfg), "--base-url", emu.base_url, env=env or None)
        assert CANARY_KEY not in r.stdout + r.stderr
        if r.returncode != 75 and r.returncode != -signal.SIGKILL:
            return r
    raise AssertionError("did not finish")


def sweep_point(
    point: str,
    ks: list[int] | None,
    rows50: Path,
    golden: pl.DataFrame,
    base: Path,
    emulator_process,
    compound: bool = False,
    journal_mode: str = "auto",
) -> int:
    """Crash at the k-th hit of `point` for each k (all k until the run no longer crashes when ks is None)."""
    emu = emulator_process("--time-scale", "0.001")
    k = 0
    cases = 0
    while True:
        k += 1
        if ks is not None and k > max(ks):
            return cases
        if ks is not None and k not in ks:
            continue
        emu.post("/_emulator/reset")
        d = base / f"{point}-{k}"
        d.mkdir()
        cfg = _config(d, rows50, journal_mode=journal_mode)
        first = run_enrich("run", str(cfg), "--base-url", emu.base_url, env=_env(f"{point}:{k}"))
        cases += 1
        if first.returncode != -signal.SIGKILL:
            assert first.returncode == 0, first.stderr
            check_oracle(d, emu, golden)
            return cases  # k is past the last hit: the sweep for this point is complete
        if compound:  # crash again, during the resume itself
            again = run_enrich("run", str(cfg), "--base-url", emu.base_url, env=_env(f"{point}:1"))
            assert again.returncode in (0, -signal.SIGKILL), again.stderr
        r = resume_until_done(cfg, emu)
        assert r.returncode == 0, r.stderr
        check_oracle(d, emu, golden)
        if journal_mode != "auto":
            assert_journal_mode(d / "out.csv.journal.sqlite", journal_mode)


@pytest.mark.parametrize("point", POINTS)
def test_failpoint_first_and_second_hit(
    point: str, rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process
) -> None:
    """Fast subset: SIGKILL at the 1st and 2nd hit of each failpoint, then resume."""
    sweep_point(point, [1, 2], rows50, golden, tmp_path, emulator_process)


@pytest.mark.parametrize("journal_mode", ["local", "network"])
def test_failpoint_crash_during_resume(
    rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process, journal_mode: str
) -> None:
    """Crash after sending, then crash again while resuming (reconciling), then finish: in both journal modes."""
    sweep_point(
        "after_send_before_response",
        [2],
        rows50,
        golden,
        tmp_path,
        emulator_process,
        compound=True,
        journal_mode=journal_mode,
    )


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_failpoint_sweep_every_k(
    point: str, rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process
) -> None:
    """Exhaustive: every k from 1 until the run completes without the failpoint firing."""
    assert sweep_point(point, None, rows50, golden, tmp_path, emulator_process) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_failpoint_sweep_compound(
    point: str, rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process
) -> None:
    sweep_point(point, None, rows50, golden, tmp_path, emulator_process, compound=True)


def test_lost_and_truncated_responses(rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process) -> None:
    """10% of requests dropped after the create is committed, 5% truncated: no duplicate, no lost row."""
    emu = emulator_process("--time-scale", "0.001", "--faults", "drop=0.1,truncate=0.05", "--seed", "7")
    cfg = _config(tmp_path, rows50, limits="batch_size = 2\nmax_in_flight = 20")
    r = resume_until_done(cfg, emu)
    assert r.returncode == 0, r.stderr
    faults = emu.stats()["faults_injected"]
    assert faults.get("add_runs drop", 0) + faults.get("add_runs truncate", 0) >= 2, faults
    check_oracle(tmp_path, emu, golden)


def test_429_storm_honours_retry_after_and_rate(
    rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process
) -> None:
    """30% 429 with Retry-After: 2 s: completes; no create before its Retry-After; rate <= configured + 10%."""
    emu = emulator_process("--time-scale", "0", "--faults", "429=0.3,retry_after=2", "--seed", "3")
    cfg = _config(tmp_path, rows50, limits="batch_size = 10\nmax_in_flight = 50\nrequests_per_minute = 120")
    r = resume_until_done(cfg, emu)
    assert r.returncode == 0, r.stderr
    check_oracle(tmp_path, emu, golden)
    creates = [(t, status) for t, m, route, status in emu.get("/_emulator/requests") if route == "add_runs"]
    assert any(s == 429 for _, s in creates)
    for (t0, s0), (t1, _) in itertools.pairwise(creates):
        if s0 == 429:
            assert t1 - t0 >= 2.0 - 0.05, "a create arrived before the Retry-After had elapsed"
        else:
            assert t1 - t0 >= (60 / 120) / 1.1 - 0.02, "create rate above the configured limit + 10%"


def test_auth_error_ends_run_with_exit_5_and_journal_intact(rows50: Path, tmp_path: Path, emulator_process) -> None:
    """401: exit 5 after one request, nothing created, rows still pending, resumable with the right key."""
    emu = emulator_process("--time-scale", "0", "--api-key", "the-right-key")
    cfg = _config(tmp_path, rows50)
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 5 and CANARY_KEY not in r.stderr
    assert emu.ledger() == []
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    assert j.counts() == {"pending": N_ROWS} and j.spent_micros() == 0
    j.close()
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, key="the-right-key")
    assert r.returncode == 0


def test_payment_required_ends_run_with_exit_5(rows50: Path, tmp_path: Path, emulator_process) -> None:
    emu = emulator_process("--time-scale", "0", "--credit-usd", "0.1")  # 20 lite runs
    cfg = _config(tmp_path, rows50, limits="batch_size = 10\nmax_in_flight = 50")
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 5, r.stderr
    assert len(emu.ledger()) <= 20
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    assert j.spent_micros() == sum(x["price_micros"] for x in emu.ledger())
    j.close()


def test_row_timeout(rows50: Path, tmp_path: Path, emulator_process) -> None:
    """Runs still active after row_timeout_s become timed_out (exit 3); the report warns about billing."""
    emu = emulator_process("--time-scale", "10")
    cfg = _config(tmp_path, rows50, limits="batch_size = 50\nrow_timeout_s = 1")
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 3, r.stderr
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    assert set(out["_enrich_status"]) == {"timed_out"}
    import json

    report = json.loads((tmp_path / "out.csv.report.json").read_text())
    assert "billed" in report["timed_out_note"]


def test_failed_runs_are_recorded_with_their_error(rows50: Path, tmp_path: Path, emulator_process) -> None:
    emu = emulator_process("--time-scale", "0", "--fail-rate", "0.2", "--seed", "5")
    cfg = _config(tmp_path, rows50)
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 3
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    failed = out.filter(pl.col("_enrich_status") == "failed")
    assert 0 < failed.height < N_ROWS and all("emulated failure" in e for e in failed["_enrich_error"])
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 3 and len(emu.ledger()) == N_ROWS  # failed rows are kept, not re-paid
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, "--retry-failed")
    assert len(emu.ledger()) > N_ROWS


@pytest.mark.parametrize("outage_s", [6, pytest.param(20, marks=pytest.mark.slow)])
def test_outage_opens_breaker_and_recovers(
    outage_s: int, rows50: Path, golden: pl.DataFrame, tmp_path: Path, emulator_process
) -> None:
    """100% 503 for a while: the breaker opens, probes at most once per cooldown, and the run completes."""
    emu = emulator_process("--time-scale", "0.005")
    cfg = _config(tmp_path, rows50, limits="batch_size = 2\nmax_in_flight = 4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: len(emu.ledger()) >= 6, timeout=30)
    emu.post("/_emulator/faults", {"faults": "503=1"})
    t_start = time.time()
    time.sleep(outage_s)
    emu.post("/_emulator/faults", {"faults": ""})
    t_end = time.time()
    assert proc.wait(120) == 0
    creates = [
        t for t, m, route, status in emu.get("/_emulator/requests") if route == "add_runs" and t_start <= t < t_end
    ]
    # 5 failures open the breaker; then at most one probe per cooldown (2 s, doubling)
    assert len(creates) <= 5 + outage_s / 2 + 1, f"{len(creates)} creating POSTs during a {outage_s} s outage"
    check_oracle(tmp_path, emu, golden)


@pytest.mark.slow
@pytest.mark.parametrize("journal_mode", ["local", "network"])
def test_random_sigkills_during_2000_row_run(tmp_path: Path, emulator_process, journal_mode: str) -> None:
    """20 SIGKILLs at random times during a 2,000-row run with 429/500/drop faults; then finish (both modes)."""
    src = tmp_path / "big.csv"
    src.write_text("company,website\n" + "".join(f"Company {i},https://c{i}.example\n" for i in range(2000)))
    emu = emulator_process("--time-scale", "0.0005", "--faults", "429=0.05,500=0.02,drop=0.02", "--seed", "11")
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company"],
        limits=f'batch_size = 50\nmax_in_flight = 200\nbudget_usd = 20\njournal_mode = "{journal_mode}"',
    )
    kill_at_random(cfg, emu, kills=20, seed=1, lo=0.3, hi=2.0)
    r = resume_until_done(cfg, emu)
    assert r.returncode == 0, r.stderr
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    assert out.height == 2000 and set(out["_enrich_status"]) == {"completed"}
    check_oracle(tmp_path, emu, None, budget_usd=20)
    assert_journal_mode(tmp_path / "out.csv.journal.sqlite", journal_mode)


@pytest.mark.slow
def test_budget_never_crossed_across_kills(tmp_path: Path, emulator_process) -> None:
    """Budget for 300 of 1,000 runs, 10 kills: ledger cost never above it; exit 4; a larger budget finishes."""
    src = tmp_path / "in.csv"
    src.write_text("company\n" + "".join(f"Co {i}\n" for i in range(1000)))
    emu = emulator_process("--time-scale", "0.001", "--faults", "drop=0.05", "--seed", "2")
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company"],
        limits="batch_size = 20\nmax_in_flight = 60\nbudget_usd = 1.5",
    )

    def within_budget() -> None:
        assert sum(x["price_micros"] for x in emu.ledger()) <= 1_500_000

    kill_at_random(cfg, emu, kills=10, seed=4, lo=0.3, hi=1.5, after_each=within_budget)
    r = resume_until_done(cfg, emu)
    assert r.returncode == 4, r.stderr
    assert sum(x["price_micros"] for x in emu.ledger()) <= 1_500_000
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, "--budget", "10")
    assert r.returncode == 0, r.stderr
    check_oracle(tmp_path, emu, None, budget_usd=10)
