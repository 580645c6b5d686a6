"""Pay once for the same research (reuse.py): one run per distinct input, a cache shared by jobs, `where`.

Every test runs `enrich` against the emulator over loopback and checks what was paid for against the
emulator's ledger (every run ever created, with its input and metadata).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from enrich.config import load_config
from enrich.failpoints import POINTS
from enrich.job import run_job
from enrich.journal import Finished, Journal
from enrich.reuse import ResultCache, Reuse
from tests.conftest import CANARY_KEY, ROOT, run_enrich, wait_for, write_config

SP_KNOWLEDGE = ("--knowledge-key", "Security", "--time-scale", "0.001")


def dup_input(path: Path, sp500: Path, distinct: int = 50, copies: int = 3) -> Path:
    """`distinct` S&P companies, each `copies` times under its own key; `note` differs but is not sent."""
    with sp500.open(encoding="utf-8", newline="") as f:
        src = list(csv.DictReader(f))[:distinct]
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "Security", "note"])
        n = 0
        for copy in range(copies):
            for r in src:
                n += 1
                w.writerow([f"k{n}", r["Security"], f"copy {copy}"])
    return path


def first_rows(path: Path, sp500: Path, n: int) -> Path:
    lines = sp500.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return path


def config(
    d: Path,
    src: Path,
    *,
    key: str = "id",
    out: str = "out.csv",
    inp: str = "",
    cache: Path | None = None,
    limits: str = "batch_size = 20\nmax_in_flight = 40",
    extra: str = "",
    name: str = "job.toml",
) -> Path:
    """A job researching headquarters from `Security`; `inp` adds `[input]` settings, `cache` a `[cache]` table."""
    path = write_config(
        d / name,
        input_path=src,
        output=d / out,
        key=[key],
        columns=["Security"],
        limits=limits,
        extra=extra,
    )
    text = path.read_text().replace("[input]\n", f"[input]\n{inp}\n", 1)
    if cache is not None:
        text += f"\n[cache]\npath = {json.dumps(str(cache))}\n"
    path.write_text(text)
    return path


def truth(sp500: Path) -> dict[str, str]:
    src = pl.read_csv(sp500, infer_schema=False)
    return dict(zip(src["Security"], src["Headquarters Location"], strict=True))


def runs_per_input(ledger: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["input"]["Security"] for r in ledger)


def check_dedupe(d: Path, src: Path, emu: Any, sp500: Path, out: str = "out.csv") -> pl.DataFrame:
    """Every row once, in order, its own key and its company's facts; one run per distinct input; twins show the
    one run; nothing in doubt; the journal's spend is the ledger's."""
    ledger = emu.ledger()
    per_input = runs_per_input(ledger)
    got = pl.read_csv(d / out, infer_schema=False)
    given = pl.read_csv(src, infer_schema=False)
    assert got["id"].to_list() == given["id"].to_list()
    assert got["note"].to_list() == given["note"].to_list()
    facts = truth(sp500)
    assert got["headquarters_location"].to_list() == [facts[s] for s in got["Security"]]
    assert set(per_input) == set(given["Security"]) and max(per_input.values()) == 1, per_input.most_common(3)
    run_of = {r["input"]["Security"]: r["run_id"] for r in ledger}
    assert got["_enrich_run_id"].to_list() == [run_of[s] for s in got["Security"]]
    j = Journal.open(d / f"{out}.journal.sqlite", readonly=True)
    try:
        counts = j.counts()
        assert not any(counts.get(s) for s in ("intent", "unknown", "submitted", "pending")), counts
        assert j.spent_micros() == sum(r["price_micros"] for r in ledger)
        assert j.integrity_ok()
    finally:
        j.close()
    return got


# ---- 1. one run per distinct input ---------------------------------------------------------------------------


def test_150_rows_of_50_inputs_make_50_runs_each_row_with_its_own_key_and_facts(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """150 rows holding 50 companies three times: 50 runs; every row keeps its key and gets its company's facts."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500)
    r = run_enrich("run", str(config(tmp_path, src)), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 50
    check_dedupe(tmp_path, src, emu, sp500)
    assert "100 rows took the run of an identical row" in r.stderr
    report = json.loads((tmp_path / "out.csv.report.json").read_text())
    assert report["reuse"]["rows_sharing_a_run"] == 100 and report["reuse"]["dedupe_saved_usd"] == 0.5


def test_dedupe_off_makes_a_run_per_row_each_showing_its_own(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """`[input] dedupe = false`: 150 runs, one per row, and each row shows the run made for it."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500)
    r = run_enrich("run", str(config(tmp_path, src, inp="dedupe = false")), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    ledger = emu.ledger()
    assert len(ledger) == 150 and set(runs_per_input(ledger).values()) == {3}
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    refs = dict(j.conn.execute("SELECT row_key, row_ref FROM rows").fetchall())
    j.close()
    run_of_ref = {r["metadata"]["enrich_row"]: r["run_id"] for r in ledger}
    assert out["_enrich_run_id"].to_list() == [run_of_ref[refs[json.dumps([k])]] for k in out["id"]]


def test_rows_differing_only_in_a_column_not_sent_share_a_run_but_a_sent_column_splits_them(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """`note` is not sent: rows differing only there share a run; sending `note` too makes each row distinct."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=10, copies=2)
    assert run_enrich("run", str(config(tmp_path, src)), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 10
    emu.post("/_emulator/reset")
    cfg = config(tmp_path, src, out="sent.csv")
    cfg.write_text(cfg.read_text().replace('columns = ["Security"]', 'columns = ["Security", "note"]'))
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 20


def test_plan_shows_distinct_inputs_in_rows_and_prices_the_distinct_ones(tmp_path: Path, sp500: Path) -> None:
    """`plan`: "50 distinct inputs in 150 rows", and the cost of 50 runs ($0.25), not 150."""
    src = dup_input(tmp_path / "dup.csv", sp500)
    r = run_enrich("plan", str(config(tmp_path, src)), key=None)
    assert r.returncode == 0, r.stderr
    assert "50 distinct inputs in 150 rows" in r.stdout
    assert "to submit            50 " in r.stdout and "estimated cost       $0.25" in r.stdout, r.stdout


def test_a_budget_that_binds_reserves_one_run_per_distinct_input(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """Budget for 20 runs: 20 runs serve their 60 rows, 90 are skipped_budget; spend = ledger <= budget; more
    budget finishes the job with 50 runs in all."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500)
    cfg = config(tmp_path, src, limits="batch_size = 20\nmax_in_flight = 40\nbudget_usd = 0.10")
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 4, r.stderr
    ledger = emu.ledger()
    assert len(ledger) == 20 and sum(x["price_micros"] for x in ledger) <= 100_000
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    assert Counter(out["_enrich_status"]) == {"completed": 60, "skipped_budget": 90}
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    assert j.spent_micros() == sum(x["price_micros"] for x in ledger)
    j.close()
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, "--budget", "1")
    assert r.returncode == 0, r.stderr
    check_dedupe(tmp_path, src, emu, sp500)


def test_escalation_climbs_the_shared_run_once(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """With a ladder, a distinct input climbs once: base runs = distinct inputs that needed it, and twins agree."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE, "--hard-rate", "0.5", "--seed", "3")
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=40)
    cfg = config(tmp_path, src, name="job.toml")
    cfg.write_text(cfg.read_text() + '\n[escalate]\nprocessors = ["base"]\n')
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    ledger = emu.ledger()
    per = Counter((x["input"]["Security"], x["processor"]) for x in ledger)
    assert max(per.values()) == 1
    base = {s for s, p in per if p == "base"}
    assert 0 < len(base) < 40
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    for _, group in out.group_by("Security"):
        assert group["headquarters_location__processor"].n_unique() == 1
        assert group["headquarters_location__decision"].n_unique() == 1
        assert group["_enrich_run_id"].n_unique() == 1
    climbed = set(out.filter(pl.col("headquarters_location__processor") == "base")["Security"])
    assert climbed <= base


def test_a_failed_escalation_step_is_shared_by_the_twins_and_never_paid_again(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """The leader's escalation run fails: its twins share the failure and the fall-back, none climbs on its own."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE, "--hard-rate", "1.0")
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=10)
    cfg = config(tmp_path, src, name="job.toml")
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 10
    failing = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE, "--fail-rate", "1.0")
    cfg.write_text(cfg.read_text() + '\n[escalate]\nprocessors = ["base"]\non = ["rejected", "review"]\n')
    r = run_enrich("run", str(cfg), "--base-url", failing.base_url)
    assert r.returncode == 0, r.stderr
    per = Counter((x["input"]["Security"], x["processor"]) for x in failing.ledger())
    assert set(per) == {(s, "base") for s in pl.read_csv(src)["Security"]} and max(per.values()) == 1, per
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    assert set(out["_enrich_status"]) == {"completed"} and set(out["headquarters_location__processor"]) == {"lite-fast"}


def test_human_verdicts_stay_with_their_row_key(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """A verdict on one of three twins changes that row only; its twins keep the shared run's decision."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE, "--hard-rate", "0.6", "--seed", "5")
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=20)
    cfg = config(tmp_path, src)
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    review = tmp_path / "out.review.csv"
    with review.open(encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    company = dict(zip(*pl.read_csv(src, infer_schema=False).select("id", "Security").get_columns(), strict=True))
    first = next(ln for ln in lines if ln["confidence"] == "medium")
    twins = [ln["id"] for ln in lines if company[ln["id"]] == company[first["id"]] and ln["id"] != first["id"]]
    assert len(twins) == 2  # the same answer, in review on each of its three rows
    first["verdict"], first["reviewer"] = "accept", "ann"
    with review.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerow(first)
    r = run_enrich("review", "apply", str(cfg), str(review))
    assert r.returncode == 0, r.stderr
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    decision = dict(zip(out["id"], out["headquarters_location__decision"], strict=True))
    assert decision[first["id"]] == "human_accepted"
    assert [decision[t] for t in twins] == ["review", "review"]
    assert len(emu.ledger()) == 20


@pytest.mark.parametrize(
    "point", ["after_intent_commit:1", "after_send_before_response:2", "after_result_commit:1", "mid_poll:1"]
)
def test_sigkill_with_dedupe_then_resume_pays_once_per_distinct_input(
    point: str, tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """SIGKILL at a failpoint, resume: one run per distinct input, every row once with its own facts."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=30)
    cfg = config(tmp_path, src, limits="batch_size = 10\nmax_in_flight = 20")
    first = run_enrich("run", str(cfg), "--base-url", emu.base_url, env={"ENRICH_FAILPOINT": point})
    assert first.returncode == -signal.SIGKILL, first.stderr
    _resume(cfg, emu)
    check_dedupe(tmp_path, src, emu, sp500)


def _resume(cfg: Path, emu: Any, tries: int = 6, **env: str) -> subprocess.CompletedProcess[str]:
    for _ in range(tries):
        r = run_enrich("run", str(cfg), "--base-url", emu.base_url, env=env or None)
        if r.returncode not in (75, -signal.SIGKILL):
            assert r.returncode == 0, r.stderr
            return r
    raise AssertionError("did not finish")


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_failpoint_sweep_with_dedupe(point: str, tmp_path: Path, sp500: Path, emulator_process) -> None:
    """Every k of every failpoint, with twins: 0 duplicate runs per distinct input, every row once, its own facts."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=30)
    k = 0
    while True:
        k += 1
        emu.post("/_emulator/reset")
        d = tmp_path / f"k{k}"
        d.mkdir()
        cfg = config(d, src, limits="batch_size = 10\nmax_in_flight = 20")
        first = run_enrich("run", str(cfg), "--base-url", emu.base_url, env={"ENRICH_FAILPOINT": f"{point}:{k}"})
        if first.returncode != -signal.SIGKILL:
            assert first.returncode == 0, first.stderr
            check_dedupe(d, src, emu, sp500)
            break
        again = run_enrich("run", str(cfg), "--base-url", emu.base_url, env={"ENRICH_FAILPOINT": f"{point}:1"})
        assert again.returncode in (0, -signal.SIGKILL), again.stderr
        _resume(cfg, emu)
        check_dedupe(d, src, emu, sp500)
    assert k >= 2


@pytest.mark.slow
def test_random_sigkills_with_dedupe_and_a_cache(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """SIGKILLs at random moments of a job with twins and a shared cache: one run per input, the cache readable."""
    import random
    import time

    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.01")
    src = dup_input(tmp_path / "dup.csv", sp500, distinct=150)
    cache = tmp_path / "cache.sqlite"
    cfg = config(tmp_path, src, cache=cache, limits="batch_size = 10\nmax_in_flight = 30")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    rng = random.Random(18)
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.5, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if cache.exists() and cache.stat().st_size:  # a kill during start-up comes before the cache is made
            c = ResultCache.open(cache, create=False)
            assert c.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            c.stats()
            c.close()
    _resume(cfg, emu)
    check_dedupe(tmp_path, src, emu, sp500)
    c = ResultCache.open(cache, create=False)
    assert c.stats()["entries"] == 150
    c.close()


# ---- 2. a results cache shared across jobs --------------------------------------------------------------------


def _job(d: Path, src: Path, cache: Path | None, **kw: Any) -> Path:
    d.mkdir(exist_ok=True)
    return config(d, src, key="Symbol", cache=cache, **kw)


def test_a_second_job_pays_only_for_what_the_cache_lacks(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """Job A on 250 S&P rows, then job B (other output and journal, same cache) on all 503: B creates 253 runs,
    and its 250 rows served from the cache carry A's run ids."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cache = tmp_path / "shared" / "results.sqlite"
    a = _job(tmp_path / "a", first_rows(tmp_path / "a250.csv", sp500, 250), cache)
    assert run_enrich("run", str(a), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 250
    b = _job(tmp_path / "b", sp500, cache)
    plan = run_enrich("plan", str(b), key=None)
    plan_emulated = run_enrich("plan", str(b), "--emulator", key=None)
    r = run_enrich("run", str(b), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 250 + 253
    assert max(runs_per_input(emu.ledger()).values()) == 1
    out_a = pl.read_csv(tmp_path / "a" / "out.csv", infer_schema=False)
    out_b = pl.read_csv(tmp_path / "b" / "out.csv", infer_schema=False)
    facts = truth(sp500)
    assert out_b["headquarters_location"].to_list() == [facts[s] for s in out_b["Security"]]
    assert out_b.head(250)["_enrich_run_id"].to_list() == out_a["_enrich_run_id"].to_list()
    assert "250 rows served from the results cache (250 results; $1.2500 not paid)" in r.stderr
    # plan could not know B talks to an emulator: it assumes the real API, whose results the cache lacks
    assert "from the shared cache" not in plan.stdout
    assert "503 distinct inputs in 503 rows; 250 of them from the shared cache" in plan_emulated.stdout
    assert "to submit            253 " in plan_emulated.stdout


def test_concurrent_jobs_pay_twice_only_for_inputs_both_claimed_before_either_was_cached(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """A and B on one cache at once: a row is never claimed after its input's result was in the cache (the claim's
    own look-up saw every entry numbered up to its `cache_seq`); each job pays at most once per input."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.02")
    cache = tmp_path / "results.sqlite"
    limits = "batch_size = 10\nmax_in_flight = 20"
    a = _job(tmp_path / "a", first_rows(tmp_path / "a250.csv", sp500, 250), cache, limits=limits)
    b = _job(tmp_path / "b", sp500, cache, limits=limits)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    env["PARALLEL_API_KEY"] = CANARY_KEY

    def start(cfg: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )

    pa = start(a)
    wait_for(lambda: cache.exists() and _entries(cache) >= 40, timeout=60)
    pb = start(b)
    assert pa.wait(180) == 0 and pb.wait(180) == 0
    ledger = emu.ledger()
    group_of = {"a": _group(tmp_path / "a"), "b": _group(tmp_path / "b")}
    per_job = Counter((r["taskgroup_id"], r["input"]["Security"]) for r in ledger)
    assert max(per_job.values()) == 1  # within a job: once per input
    entries = _entry_rows(cache)  # run id -> (seq, input hash)
    claimed = {**_claims(tmp_path / "a"), **_claims(tmp_path / "b")}  # run id -> the cache_seq its claim saw
    by_input: dict[str, list[str]] = {}
    for r in ledger:
        by_input.setdefault(r["input"]["Security"], []).append(r["run_id"])
    twice = {s: ids for s, ids in by_input.items() if len(ids) > 1}
    for ids in twice.values():
        first, second = sorted(ids, key=lambda rid: entries[rid][0])
        assert claimed[second] < entries[first][0], "a row was claimed after its input's result was in the cache"
    assert len(ledger) < 250 + 503  # B was served from the cache (it started after A had cached 40 results)
    assert len(ledger) >= 503 and set(by_input) == set(pl.read_csv(sp500, infer_schema=False)["Security"])
    assert all(t in (group_of["a"], group_of["b"]) for t, _ in per_job)


def _entries(cache: Path) -> int:
    try:
        with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.Error:
        return 0


def _entry_rows(cache: Path) -> dict[str, tuple[int, str]]:
    c = ResultCache.open(cache, create=False)
    try:
        return {r[0]: (r[1], r[2]) for r in c.conn.execute("SELECT run_id, seq, input_hash FROM entries")}
    finally:
        c.close()


def _claims(d: Path) -> dict[str, int]:
    j = Journal.open(d / "out.csv.journal.sqlite", readonly=True)
    try:
        return dict(j.conn.execute("SELECT run_id, cache_seq FROM rows WHERE reused IS NULL AND run_id IS NOT NULL"))
    finally:
        j.close()


def _group(d: Path) -> str:
    j = Journal.open(d / "out.csv.journal.sqlite", readonly=True)
    try:
        return str(j.get("taskgroup_id"))
    finally:
        j.close()


def test_kill_9_during_a_cache_write_leaves_it_readable_with_no_partial_entry(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """SIGKILL inside the cache's write transaction: the cache opens, holds nothing of it; the next run publishes
    what the journal recorded, paying for nothing again."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cache = tmp_path / "results.sqlite"
    cfg = _job(tmp_path / "a", first_rows(tmp_path / "a60.csv", sp500, 60), cache, limits="batch_size = 20")
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, env={"ENRICH_FAILPOINT": "mid_cache_write:1"})
    assert r.returncode == -signal.SIGKILL
    c = ResultCache.open(cache, create=False)
    assert c.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert c.stats()["entries"] == 0
    c.close()
    paid = len(emu.ledger())
    assert paid > 0
    _resume(cfg, emu)
    assert max(runs_per_input(emu.ledger()).values()) == 1
    c = ResultCache.open(cache, create=False)
    assert c.stats()["entries"] == 60
    c.close()


def test_a_corrupt_or_foreign_cache_is_refused_with_one_line_and_nothing_sent(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """Text, an enrich journal, a newer cache: exit 2, one line naming the file, no run created."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = first_rows(tmp_path / "a10.csv", sp500, 10)
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database\n" * 200)
    journal = tmp_path / "j.sqlite"
    Journal.open(journal).close()
    newer = tmp_path / "newer.sqlite"
    ResultCache.open(newer).close()
    with sqlite3.connect(newer) as c:
        c.execute("UPDATE meta SET v='99' WHERE k='version'")
    for bad, why in ((text, "not a usable results cache"), (journal, "not an enrich results cache"), (newer, "newer")):
        cfg = _job(tmp_path / bad.stem, src, bad)
        r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and why in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert emu.ledger() == []
    assert text.read_text().startswith("not a database")  # never overwritten


def test_a_cache_path_under_an_unknown_users_home_is_refused_with_one_line(tmp_path: Path, sp500: Path) -> None:
    """`~nosuchuser/...` as [cache] path, --cache or `cache stats`: exit 2 and one line, not a traceback."""
    src = first_rows(tmp_path / "a10.csv", sp500, 10)
    far = "~enrich-no-such-user-x9/results.sqlite"
    cfg = config(tmp_path, src, key="Symbol", extra=f"[cache]\npath = {json.dumps(far)}\n")
    plain = config(tmp_path, src, key="Symbol", name="plain.toml")
    for args in (
        ("plan", str(cfg)),
        ("run", str(plain), "--emulator", "--cache", far),
        ("cache", "stats", far),
        ("cache", "prune", far, "--older-than", "1d"),
    ):
        r = run_enrich(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and far in lines[0], (args, r.stderr)
    assert not (tmp_path / "out.csv").exists()


class _LooksReal(httpx.AsyncBaseTransport):
    """Loopback to the emulator, with its `x-enrich-emulator*` headers removed: to enrich, the real API."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        headers = [(k, v) for k, v in response.headers.multi_items() if not k.lower().startswith("x-enrich-emulator")]
        return httpx.Response(
            response.status_code, headers=headers, stream=response.stream, extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_emulated_results_are_never_served_to_a_real_api_job(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """A cache filled by an emulated job serves nothing to a job that talks to (what looks like) the real API."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cache = tmp_path / "results.sqlite"
    src = first_rows(tmp_path / "a30.csv", sp500, 30)
    assert run_enrich("run", str(_job(tmp_path / "a", src, cache)), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 30
    cfg = load_config(_job(tmp_path / "b", src, cache), {"api.base_url": emu.base_url})
    result = run_job(cfg, api_key=CANARY_KEY, install_signals=False, transport=_LooksReal())
    assert result.exit_code == 0, result.message
    assert len(emu.ledger()) == 60  # all 30 paid again: the cache's entries are the emulator's
    assert not result.report["emulated"]
    c = ResultCache.open(cache, create=False)
    by_origin = c.stats()["by_origin"]
    c.close()
    assert by_origin["emulator"]["lite-fast"]["entries"] == 30 and by_origin["api"]["lite-fast"]["entries"] == 30


def test_refresh_fresh_and_no_cache_bypass_the_cache(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """Entries older than refresh_after_days are not reused; --fresh and --no-cache do not read the cache."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cache = tmp_path / "results.sqlite"
    src = first_rows(tmp_path / "a20.csv", sp500, 20)
    assert run_enrich("run", str(_job(tmp_path / "a", src, cache)), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 20
    with sqlite3.connect(cache) as c:
        c.execute("UPDATE entries SET completed_at = completed_at - 3 * 86400")  # three days old
    stale = _job(tmp_path / "b", src, cache, extra="refresh_after_days = 2")
    assert run_enrich("run", str(stale), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 40
    fresh = _job(tmp_path / "c", src, cache)
    assert run_enrich("run", str(fresh), "--base-url", emu.base_url, "--fresh").returncode == 0
    assert len(emu.ledger()) == 60
    assert run_enrich("run", str(_job(tmp_path / "d", src, None)), "--base-url", emu.base_url, "--cache", str(cache))
    assert len(emu.ledger()) == 60  # --cache PATH: served
    off = _job(tmp_path / "e", src, cache)
    assert run_enrich("run", str(off), "--base-url", emu.base_url, "--no-cache").returncode == 0
    assert len(emu.ledger()) == 80


def test_cache_stats_and_prune(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """`enrich cache stats` counts entries and their value; `prune --older-than 90d` removes only older ones."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cache = tmp_path / "results.sqlite"
    src = first_rows(tmp_path / "a20.csv", sp500, 20)
    assert run_enrich("run", str(_job(tmp_path / "a", src, cache)), "--base-url", emu.base_url).returncode == 0
    with sqlite3.connect(cache) as c:
        c.execute("UPDATE entries SET completed_at = completed_at - 100 * 86400 WHERE seq <= 5")
    stats = json.loads(run_enrich("cache", "stats", str(cache), "--json").stdout)
    assert stats["entries"] == 20 and stats["value_usd"] == 0.1
    r = run_enrich("cache", "prune", str(cache), "--older-than", "90d")
    assert r.returncode == 0 and "removed 5 entries" in r.stderr, r.stderr
    assert json.loads(run_enrich("cache", "stats", str(cache), "--json").stdout)["entries"] == 15
    assert run_enrich("cache", "prune", str(cache), "--older-than", "soon").returncode == 2
    r = run_enrich("cache", "stats", str(tmp_path / "none.sqlite"))
    assert r.returncode == 2 and "--cache PATH or [cache] path" in r.stderr, r.stderr  # says how one is made


# ---- 3. rows that need no research ----------------------------------------------------------------------------


def test_where_researches_only_matching_rows_the_others_come_back_unchanged_as_skipped(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """`where`: non-matching rows create no run, appear once in order with their input unchanged, status skipped,
    empty researched columns; exit 0; plan counts the selected rows."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = tmp_path / "sp.csv"
    with sp500.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    for r in rows[1:101]:
        r[4] = ""  # these companies' headquarters are unknown: only they need research
    with src.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    where = '"Headquarters Location" IS NULL AND "GICS Sector" != \'Industrials\''
    cfg = _job(tmp_path / "a", src, None, inp=f"where = {json.dumps(where)}")
    given = pl.read_csv(src, infer_schema=False)
    wanted = given.head(100).filter(pl.col("GICS Sector") != "Industrials")
    plan = run_enrich("plan", str(cfg), key=None)
    assert f"selected by where    {wanted.height:,}  ({503 - wanted.height} skipped" in plan.stdout, plan.stdout
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    ledger = emu.ledger()
    assert sorted(x["input"]["Security"] for x in ledger) == sorted(wanted["Security"])
    out = pl.read_csv(tmp_path / "a" / "out.csv", infer_schema=False)
    assert out.select(given.columns).equals(given)
    picked = out["Security"].is_in(wanted["Security"].to_list())
    assert set(out.filter(picked)["_enrich_status"]) == {"completed"}
    rest = out.filter(~picked)
    assert set(rest["_enrich_status"]) == {"skipped"}
    assert (
        rest["headquarters_location"].null_count() == rest.height and rest["_enrich_run_id"].null_count() == rest.height
    )


def test_rows_in_flight_that_a_new_where_leaves_out_are_skipped_when_their_results_come_not_escalated(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """Killed with runs in flight, resumed with a where that selects none of them: their results are kept and the
    rows come back skipped, no escalation step is paid for them; the where dropped, they climb once each."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE, "--hard-rate", "1.0")
    src = first_rows(tmp_path / "a10.csv", sp500, 10)
    ladder = '\n[escalate]\nprocessors = ["base"]\non = ["rejected", "review"]\n'
    cfg = _job(tmp_path / "a", src, None)
    cfg.write_text(cfg.read_text() + ladder)
    first = run_enrich(
        "run", str(cfg), "--base-url", emu.base_url, env={"ENRICH_FAILPOINT": "after_send_before_response:1"}
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert Counter(x["processor"] for x in emu.ledger()) == {"lite-fast": 10}
    narrowed = _job(tmp_path / "a", src, None, inp="where = \"Symbol = 'NONE'\"", name="narrowed.toml")
    narrowed.write_text(narrowed.read_text() + ladder)
    r = run_enrich("run", str(narrowed), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert Counter(x["processor"] for x in emu.ledger()) == {"lite-fast": 10}
    out = pl.read_csv(tmp_path / "a" / "out.csv", infer_schema=False)
    assert set(out["_enrich_status"]) == {"skipped"} and out["headquarters_location"].null_count() == 10
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    per = Counter((x["input"]["Security"], x["processor"]) for x in emu.ledger())
    assert len(per) == 20 and max(per.values()) == 1, per


@pytest.mark.parametrize(
    ("where", "named"),
    [('"Headquarters Location" IS NUL', "not a valid SQL expression"), ("hq IS NULL", "unknown column 'hq'")],
)
def test_a_bad_where_is_refused_before_anything_is_sent(
    where: str, named: str, tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """An expression that does not parse, or names an unknown column: exit 2, one line naming it; no run."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cfg = _job(tmp_path / "a", sp500, None, inp=f"where = {json.dumps(where)}")
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and json.dumps(where) in lines[0], r.stderr
    assert emu.ledger() == []


# ---- the journal's transitions with twins (no API) -------------------------------------------------------------

TWIN_INPUTS = {"a": "x", "b": "x", "c": "y", "d": "y", "e": "y", "f": "z"}  # three distinct inputs in six rows


class TwinJournal(RuleBasedStateMachine):
    """Random claims, sends, losses, releases (some failing a row) and finished runs on a journal with twins:
    never two runs in flight for one input, exactly one claimable row per input with work left and none in
    flight, a result reaches every waiting twin at once, and the money reserved is one run per claim."""

    def __init__(self) -> None:
        super().__init__()
        self.j = Journal.open(":memory:")
        batch = [
            (json.dumps([k]), f"ref{k}", i, i + 2, json.dumps([k]), json.dumps({"c": v}), v, "s", "lite")
            for i, (k, v) in enumerate(TWIN_INPUTS.items())
        ]
        self.j.seed([batch], 1, None, False, dedupe=True)
        self.seq = 0
        self.claims = 0
        self.released = 0
        self.runs: dict[str, tuple[str, int]] = {}  # run id -> (row key, attempt)

    def rows(self, *states: str) -> list[tuple[str, int]]:
        marks = ",".join("?" * len(states))
        return self.j.conn.execute(
            f"SELECT row_key, attempts FROM rows WHERE state IN ({marks}) ORDER BY ordinal", states
        ).fetchall()

    @rule(n=st.integers(1, 6))
    def claim(self, n: int) -> None:
        self.seq += 1
        self.claims += len(self.j.claim(1, n, {"lite": 5000}, None, 0.0, self.seq))

    @precondition(lambda self: self.rows("intent"))
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        rows = data.draw(st.lists(st.sampled_from(self.rows("intent")), min_size=1, unique=True))
        ids = [f"t{self.seq}_{k}_{a}" for k, a in rows]
        self.j.mark_submitted(rows, ids, self.seq, "", 1.0)
        self.runs.update({rid: row for rid, row in zip(ids, rows, strict=True)})

    @precondition(lambda self: self.rows("intent"))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        self.j.mark_unknown([data.draw(st.sampled_from(self.rows("intent")))], "lost")

    @precondition(lambda self: self.rows("intent", "unknown"))
    @rule(data=st.data(), rejected=st.booleans())
    def release(self, data: st.DataObject, rejected: bool) -> None:
        row = data.draw(st.sampled_from(self.rows("intent", "unknown")))
        self.j.release([row], 0.0, None, "refused" if rejected else "gone", 2, count_retry=rejected)
        self.released += 1

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data: st.DataObject, ok: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.runs)))
        key, attempt = self.runs.pop(rid)
        ref = "ref" + json.loads(key)[0]
        result = '{"output": {"content": {}}}' if ok else None
        self.j.record([Finished(rid, ref, attempt, result_json=result, error=None if ok else "run failed")], 2.0)

    @invariant()
    def one_run_per_input(self) -> None:
        by_input: dict[str, list[tuple[str, int, str | None]]] = {}
        for state, waits, inp, run_inp in self.j.conn.execute(
            "SELECT state, waits, input_hash, run_input_hash FROM rows"
        ):
            by_input.setdefault(inp, []).append((state, waits, run_inp))
        for inp, rows in by_input.items():
            flying = [r for r in rows if r[0] in ("intent", "unknown", "submitted")]
            assert len(flying) <= 1, (inp, rows)
            pending = [r for r in rows if r[0] == "pending"]
            claimable = [r for r in pending if r[1] == 0]
            if pending and not flying:
                assert len(claimable) == 1, (inp, rows)
            if flying:
                assert not claimable, (inp, rows)
        with_result = {r[0] for r in self.j.conn.execute("SELECT input_hash FROM results")}
        waiting = {r[0] for r in self.j.conn.execute("SELECT input_hash FROM rows WHERE state='pending'")}
        assert not with_result & waiting  # a recorded result reached every twin waiting for it
        assert self.j.spent_micros() == 5000 * (self.claims - self.released)

    def teardown(self) -> None:
        self.j.close()


TestTwinJournal = TwinJournal.TestCase
TestTwinJournal.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_find_answers_from_the_journal_first_then_the_cache(tmp_path: Path) -> None:
    """`Reuse.find` (what a pilot asks before paying for a (row, processor)): this journal's result, else the
    cache's entry of the job's origin, else nothing; a result older than refresh_after_days does not count."""
    j = Journal.open(tmp_path / "j.sqlite")
    batch = [(json.dumps(["a"]), "refa", 0, 2, "[]", '{"c": "x"}', "hx", "s", "lite")]
    j.seed([batch], 1, None, False, dedupe=True)
    j.set("server_origin", "emulator")
    claimed = j.claim(1, 1, {"lite": 5000}, None, 0.0, 1)
    j.mark_submitted([(claimed[0].row_key, claimed[0].attempt)], ["trun_mine"], 1, "", 1.0)
    j.record([Finished("trun_mine", "refa", 1, result_json='{"output": {}}')], 100.0)
    cache = ResultCache.open(tmp_path / "c.sqlite")
    cache.put([("hy", "s", "lite", "trun_other", 200.0, '{"output": {}}')], "emulator", 200.0)
    cache.put([("hz", "s", "lite", "trun_real", 200.0, '{"output": {}}')], "api", 200.0)
    reuse = Reuse(j, cache, fresh_after=None, read=True, emulated=False)
    keys = [("hx", "s", "lite"), ("hy", "s", "lite"), ("hz", "s", "lite"), ("hx", "s", "base")]
    found = reuse.find(keys)
    assert {k: (f.source, f.run_id) for k, f in found.items()} == {
        ("hx", "s", "lite"): ("journal", "trun_mine"),
        ("hy", "s", "lite"): ("cache", "trun_other"),
    }
    stale = Reuse(j, cache, fresh_after=150.0, read=True, emulated=False)
    assert set(stale.find(keys)) == {("hy", "s", "lite")}
    cache.close()
    j.close()


def test_dedupe_off_reads_nothing_from_the_cache(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """`dedupe = false` asks for a run per row: a cache holding every input still serves none of its 150 rows."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    src = dup_input(tmp_path / "dup.csv", sp500)
    cache = tmp_path / "results.sqlite"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = config(tmp_path / "a", src, cache=cache)
    assert run_enrich("run", str(a), "--base-url", emu.base_url).returncode == 0
    assert len(emu.ledger()) == 50
    b = config(tmp_path / "b", src, cache=cache, inp="dedupe = false")
    r = run_enrich("run", str(b), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 50 + 150
    assert "served from the results cache" not in r.stderr


def test_a_forced_network_mode_keeps_the_cache_in_the_rollback_journal(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """`--journal-mode network` (a share detection misses) holds for the cache too: no WAL, and later opens
    without the flag (`enrich cache stats`, a job on auto) keep it so."""
    emu = emulator_process("--knowledge", str(sp500), *SP_KNOWLEDGE)
    cache = tmp_path / "share" / "results.sqlite"
    a = _job(tmp_path / "a", first_rows(tmp_path / "a20.csv", sp500, 20), cache)
    r = run_enrich("run", str(a), "--base-url", emu.base_url, "--journal-mode", "network")
    assert r.returncode == 0, r.stderr

    def mode() -> str:
        conn = sqlite3.connect(cache)
        try:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
        finally:
            conn.close()

    assert mode() == "delete"
    assert not Path(f"{cache}-wal").exists() and not Path(f"{cache}-shm").exists()
    assert run_enrich("cache", "stats", str(cache)).returncode == 0
    b = _job(tmp_path / "b", first_rows(tmp_path / "b30.csv", sp500, 30), cache)
    assert run_enrich("run", str(b), "--base-url", emu.base_url).returncode == 0
    assert mode() == "delete"
    assert len(emu.ledger()) == 30
