"""The pipeline end to end, as a user runs it: the CLI in its own process, the emulator in
another, over loopback HTTP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import CANARY_KEY, ROOT, run_enrich, wait_for, write_config


def sp500_config(tmp_path: Path, sp500: Path, out_name: str = "out.parquet", **kw: str) -> Path:
    return write_config(
        tmp_path / "job.toml", input_path=sp500, output=tmp_path / out_name, key=["Symbol"], columns=["Security"], **kw
    )


def dup_runs(ledger: list[dict]) -> int:
    refs = Counter((r["metadata"]["enrich_row"]) for r in ledger)
    return sum(n - 1 for n in refs.values() if n > 1)


def test_sp500_all_rows_in_order_with_own_hq(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """503 S&P rows: each gets its own headquarters, in input order, from exactly 503 runs."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.001")
    cfg = sp500_config(tmp_path, sp500)
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    src = pl.read_csv(sp500, infer_schema=False)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["Symbol"].to_list() == src["Symbol"].to_list()
    assert out["headquarters_location"].to_list() == src["Headquarters Location"].to_list()
    assert set(out["headquarters_location__confidence"]) == {"high"}
    assert all(len(c) == 1 for c in out["headquarters_location__citations"].to_list())
    ledger = emu.ledger()
    assert len(ledger) == 503
    assert dup_runs(ledger) == 0
    # only the configured columns are sent, never other CSV columns
    assert all(set(r["input"]) == {"Security"} for r in ledger)
    assert CANARY_KEY not in r.stderr + r.stdout
    # no per-row polling: a handful of requests for 503 rows
    stats = emu.stats()
    assert stats["total_requests"] < 50, stats


def test_second_run_is_free_and_identical_then_five_changed_rows(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """A finished job re-run makes no creating request; changing 5 inputs makes exactly 5 runs."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0")
    local = tmp_path / "sp.csv"
    local.write_bytes(sp500.read_bytes())
    cfg = write_config(
        tmp_path / "job.toml", input_path=local, output=tmp_path / "out.csv", key=["Symbol"], columns=["Security"]
    )
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    first = (tmp_path / "out.csv").read_bytes()
    posts = emu.stats()["creating_posts"]
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert emu.stats()["creating_posts"] == posts
    assert (tmp_path / "out.csv").read_bytes() == first
    with local.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:6]:
        row[1] = row[1] + " Holdings"
    with local.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 503 + 5


def test_budget_stops_at_100_runs_then_finishes(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """Budget for 100 runs: exit 4, <=100 runs, 403 skipped_budget; a larger budget finishes the rest."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0")
    cfg = sp500_config(tmp_path, sp500, limits="budget_usd = 0.5")  # lite-fast: $0.005 per run
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 4, r.stderr
    assert len(emu.ledger()) == 100
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert Counter(out["_enrich_status"]) == {"completed": 100, "skipped_budget": 403}
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, "--budget", "5")
    assert r.returncode == 0, r.stderr
    ledger = emu.ledger()
    assert len(ledger) == 503 and dup_runs(ledger) == 0
    assert Counter(pl.read_parquet(tmp_path / "out.parquet")["_enrich_status"]) == {"completed": 503}


def test_sigkill_mid_run_then_resume(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """SIGKILL mid-run, run again: no duplicate runs and the same output as an uninterrupted run."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.003")
    cfg = sp500_config(tmp_path, sp500, out_name="out.csv", limits="max_in_flight = 50\nbatch_size = 25")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: len(emu.ledger()) >= 150, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(emu.ledger()) < 503
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    ledger = emu.ledger()
    assert len(ledger) == 503 and dup_runs(ledger) == 0
    # golden: an uninterrupted run of the same job against a fresh emulator
    emu2 = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0")
    gold_dir = tmp_path / "gold"
    gold_dir.mkdir()
    cfg2 = sp500_config(gold_dir, sp500, out_name="out.csv")
    assert run_enrich("run", str(cfg2), "--base-url", emu2.base_url).returncode == 0
    a = pl.read_csv(tmp_path / "out.csv", infer_schema=False).drop("_enrich_run_id", "_enrich_latency_s")
    b = pl.read_csv(gold_dir / "out.csv", infer_schema=False).drop("_enrich_run_id", "_enrich_latency_s")
    assert a.equals(b)


def test_demo_config_on_embedded_emulator(tmp_path: Path) -> None:
    """The demo job: every row, confidence columns, a report marked as emulated; no key needed."""
    out = tmp_path / "demo.parquet"
    r = run_enrich(
        "run",
        "configs/companies.toml",
        "--emulator",
        "--output",
        str(out),
        "--journal",
        str(tmp_path / "demo.journal"),
        key=None,
    )
    assert r.returncode == 0, r.stderr
    df = pl.read_parquet(out)
    assert df.height == len((ROOT / "data/companies.csv").read_text().splitlines()) - 1
    assert "headquarters_location__confidence" in df.columns
    assert "internal_note" in df.columns
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["emulated"] is True and report["status_counts"] == {"completed": df.height}
    import pyarrow.parquet as pq

    assert pq.read_metadata(out).metadata[b"enrich.emulated"] == b"true"


def test_no_key_without_emulator_exits_2_with_hint(tmp_path: Path) -> None:
    """Without PARALLEL_API_KEY and without --emulator: exit 2 and a hint."""
    r = run_enrich("run", "configs/companies.toml", "--output", str(tmp_path / "o.csv"), key=None)
    assert r.returncode == 2
    assert "--emulator" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "processor,price", [("lite", 0.005), ("base-fast", 0.01), ("core", 0.025), ("pro", 0.1), ("ultra8x-fast", 2.4)]
)
def test_plan_prices_each_tier_without_requests(tmp_path: Path, processor: str, price: float) -> None:
    """`plan` prints rows x price for the processor and sends nothing (no base URL is reachable)."""
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=ROOT / "data/companies.csv",
        output=tmp_path / "o.csv",
        key=["company"],
        columns=["company", "website"],
        processor=processor,
    )
    r = run_enrich("plan", str(cfg), "--base-url", "https://unreachable.invalid")
    assert r.returncode == 0, r.stderr
    rows = len((ROOT / "data/companies.csv").read_text().splitlines()) - 1
    assert f"to submit            {rows}" in r.stdout
    assert f"estimated cost       ${rows * price:,.2f}" in r.stdout
    assert not (tmp_path / "job.journal.sqlite").exists() and not (tmp_path / "o.csv.journal.sqlite").exists()


def test_parquet_in_parquet_out_keeps_types(tmp_path: Path, emulator) -> None:
    """Parquet input keeps its column types in the Parquet output; list fields are list columns."""
    emu = emulator()
    src = tmp_path / "in.parquet"
    pl.DataFrame({"company": ["Apple", "3M", "Nobody Corp"], "rank": [1, 2, 3]}).write_parquet(src)
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.parquet",
        key=["company"],
        columns=["company"],
        fields={"founded_year": "integer", "founders": "array"},
    )
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.schema["rank"] == pl.Int64 and out.schema["founded_year"] == pl.Int64
    assert out.schema["founders"] == pl.List(pl.String)
    assert out["founded_year"].to_list() == [1976, 1902, None]
    assert out["founded_year__confidence"].to_list() == ["high", "high", "low"]


def test_csv_in_csv_out_keeps_strings_and_guards_formulas(tmp_path: Path, emulator) -> None:
    """CSV cells stay strings ("02139"); formula-looking text is neutralised, numbers are not."""
    emu = emulator()
    src = tmp_path / "in.csv"
    src.write_text('company,zip,note\nApple,02139,=HYPERLINK("x")\n3M,-2,@cmd\n', encoding="utf-8")
    cfg = write_config(
        tmp_path / "job.toml", input_path=src, output=tmp_path / "out.csv", key=["company"], columns=["company"]
    )
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["zip"] == "02139" and rows[1]["zip"] == "-2"
    assert rows[0]["note"] == '\'=HYPERLINK("x")' and rows[1]["note"] == "'@cmd"
    assert oct((tmp_path / "out.csv").stat().st_mode & 0o777) == "0o600"


def test_second_enrich_on_same_journal_is_refused(tmp_path: Path, emulator_process) -> None:
    """While a run holds the journal, a second one exits at once with 'journal is in use'."""
    emu = emulator_process("--time-scale", "0.5")  # the first run takes 5-10 s
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=ROOT / "data/companies.csv",
        output=tmp_path / "o.csv",
        key=["company"],
        columns=["company"],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    first = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: len(emu.ledger()) > 0, timeout=30)
    second = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert second.returncode == 2 and "journal is in use" in second.stderr
    assert first.poll() is None  # refused while the first still runs: it did not wait for the lock
    assert first.wait(120) == 0


def test_ctrl_c_writes_partial_output_and_resumes(tmp_path: Path, emulator_process) -> None:
    """SIGINT: exit 75, a partial output with every row, the resume command; running again finishes."""
    emu = emulator_process("--time-scale", "0.1")  # slow enough that the job is still running after `status`
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=ROOT / "data/companies.csv",
        output=tmp_path / "o.csv",
        key=["company"],
        columns=["company"],
        limits="batch_size = 5\nmax_in_flight = 10",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(emu.ledger()) >= 10, timeout=30)
    live = run_enrich("status", str(tmp_path / "o.csv.journal.sqlite"), "--json")  # works while the run is live
    assert live.returncode == 0 and json.loads(live.stdout)["rows"] > 0
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "Resume with: enrich run" in err
    with (tmp_path / "o.csv").open(encoding="utf-8", newline="") as f:
        partial = list(csv.DictReader(f))
    rows = len((ROOT / "data/companies.csv").read_text().splitlines()) - 1
    assert len(partial) == rows and "pending" in {r["_enrich_status"] for r in partial}
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == rows


def test_emulator_and_base_url_together_are_refused() -> None:
    """`--emulator` with `--base-url` is a usage error naming both (it used to ignore --base-url)."""
    for cmd in ("run", "plan"):
        r = run_enrich(cmd, "configs/companies.toml", "--emulator", "--base-url", "http://127.0.0.1:9")
        assert r.returncode == 2 and "--emulator" in r.stderr and "--base-url" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_key_file_must_be_private(tmp_path: Path) -> None:
    """PARALLEL_API_KEY_FILE readable by others is refused with exit 2."""
    key = tmp_path / "key"
    key.write_text(CANARY_KEY)
    key.chmod(0o644)
    r = run_enrich(
        "run",
        "configs/companies.toml",
        "--output",
        str(tmp_path / "o.csv"),
        key=None,
        env={"PARALLEL_API_KEY_FILE": str(key)},
    )
    assert r.returncode == 2 and "chmod 600" in r.stderr and CANARY_KEY not in r.stderr


def test_output_must_differ_from_input(tmp_path: Path) -> None:
    r = run_enrich("run", "configs/companies.toml", "--output", "data/companies.csv", "--emulator", key=None)
    assert r.returncode == 2 and "is the input file" in r.stderr
