"""enrich_frame: the notebook / Python API, over loopback HTTP against the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

import enrich
from enrich.errors import ApiUnavailable, ConfigError, InputError, JournalError, PaymentRequired
from enrich.journal import Journal
from tests.conftest import ROOT, wait_for

CONFIG = {
    "input": {"key": ["company"], "columns": ["company"]},
    "task": {
        "processor": "lite-fast",
        "output": {"headquarters_location": {"type": "string"}, "founded_year": {"type": "integer"}},
    },
    "limits": {"reconcile_grace_s": 3, "request_timeout_s": 2},
}


def frame() -> pl.DataFrame:
    return pl.read_csv(ROOT / "data/companies.csv").with_columns(pl.lit(7).alias("rank"))


def runs(emu: Any) -> int:
    return len(httpx.get(emu.base_url + "/_emulator/ledger", timeout=10).json())


def test_polars_in_polars_out_and_resume(tmp_path: Path, emulator) -> None:
    """Right rows and columns; a budget stop then a second call finishes without paying twice."""
    emu = emulator(time_scale=0.0)
    journal = tmp_path / "nb.journal.sqlite"
    part = enrich.enrich_frame(
        frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234", budget_usd=0.1
    )  # 20 runs
    assert isinstance(part, pl.DataFrame) and part.height == 55
    assert (part["_enrich_status"] == "completed").sum() == 20 and runs(emu) == 20
    out = enrich.enrich_frame(frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234")
    assert runs(emu) == 55 and (out["_enrich_status"] == "completed").all()
    assert out["company"].to_list() == frame()["company"].to_list()
    assert out.schema["rank"] == frame().schema["rank"] and out.schema["founded_year"] == pl.Int64
    assert out.filter(pl.col("company") == "Apple")["headquarters_location"].item().startswith("Cupertino")
    again = enrich.enrich_frame(frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234")
    assert runs(emu) == 55 and again.equals(out)


def test_pandas_in_pandas_out(tmp_path: Path, emulator) -> None:
    """A pandas frame comes back as pandas with the researched columns."""
    pd = pytest.importorskip("pandas")
    emu = emulator(time_scale=0.0)
    out = enrich.enrich_frame(
        frame().head(5).to_pandas(), CONFIG, journal=tmp_path / "j.sqlite", base_url=emu.base_url, api_key="sk-nb-1234"
    )
    assert isinstance(out, pd.DataFrame) and len(out) == 5
    assert "headquarters_location__confidence" in out.columns and list(out["company"]) == list(frame()["company"][:5])


def test_inside_a_running_event_loop(tmp_path: Path) -> None:
    """Called from a coroutine (as in Jupyter) with the embedded emulator: no 'event loop is running' error."""

    async def cell() -> pl.DataFrame:
        return enrich.enrich_frame(frame().head(3), CONFIG, journal=tmp_path / "j.sqlite", emulator=True)

    out = asyncio.run(cell())
    assert out.height == 3 and (out["_enrich_status"] == "completed").all()


def test_errors_raise_the_error_tree(tmp_path: Path) -> None:
    """A bad config raises ConfigError (never SystemExit)."""
    with pytest.raises(ConfigError):
        enrich.enrich_frame(frame(), {"input": {"key": []}}, journal=tmp_path / "j.sqlite", emulator=True)
    with pytest.raises(ConfigError):
        enrich.enrich_frame([1, 2], CONFIG, journal=tmp_path / "j.sqlite", emulator=True)


# ---- interrupts: a real Jupyter kernel, and a plain script ------------------------------------------

SLOW = {  # 20 runs in flight of ~0.5-1 s each against `--time-scale 0.05`: the S&P 500 takes ~20 s
    "input": {"key": ["Symbol"], "columns": ["Security"]},
    "task": {"processor": "lite-fast", "output": {"headquarters_location": {"type": "string"}}},
    "limits": {"max_in_flight": 20, "batch_size": 10, "reconcile_grace_s": 3, "request_timeout_s": 2},
}
WINDOW = SLOW["limits"]["max_in_flight"]  # runs that may still be created once an interrupt arrives
FAST = {**SLOW, "limits": {**SLOW["limits"], "max_in_flight": 600}}  # the resume: limits are not the job's identity


def call_cell(sp500: Path, journal: Path, base_url: str, cfg: dict[str, Any]) -> str:
    """Python source that calls enrich_frame and prints one JSON line saying how the call ended."""
    return f"""
import json, polars as pl, enrich
df = pl.read_csv({str(sp500)!r}, infer_schema=False)
try:
    out = enrich.enrich_frame(df, {cfg!r}, journal={str(journal)!r}, base_url={base_url!r}, api_key="sk-nb-1234")
    ended = {{"raised": None, "completed": int((out["_enrich_status"] == "completed").sum()), "rows": out.height,
             "own_hq": out["headquarters_location"].to_list() == df["Headquarters Location"].to_list()}}
except KeyboardInterrupt as exc:
    ended = {{"raised": "KeyboardInterrupt", "message": str(exc)}}
print("ENDED " + json.dumps(ended), flush=True)
"""


class Kernel:
    """An IPython kernel (ipykernel) of this interpreter, driven over the Jupyter protocol as a notebook does."""

    def __init__(self, tmp: Path):
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        spec = tmp / "kernels" / "enrich-test"
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "enrich", "language": "python"}))
        self.km = KernelManager(
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]), kernel_name="enrich-test"
        )
        self.km.start_kernel(cwd=str(tmp))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def start(self, code: str) -> str:
        return self.kc.execute(code)

    def wait(self, msg_id: str, timeout: float) -> str:
        """The cell's stdout once it has finished; fails the test when it has not within `timeout`."""
        deadline = time.monotonic() + timeout
        out = []
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                out.append(f"ERROR {content['ename']}: {content['evalue']}\n")
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)
        raise AssertionError(f"liveness: the cell did not finish within {timeout} s; output so far: {''.join(out)}")

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def ended(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("ENDED ")]
    assert lines, output
    return json.loads(lines[-1].removeprefix("ENDED "))


def assert_each_row_once(emu: Any, rows: int) -> None:
    ledger = emu.ledger()
    assert len(ledger) == rows and len({r["metadata"]["enrich_row"] for r in ledger}) == rows


def assert_journal_settled(journal: Path) -> None:
    """No row is left claimed-but-unsent or in doubt: the stop let every request in flight finish and be recorded."""
    j = Journal.open(journal, readonly=True)
    try:
        counts = j.counts(j.get("epoch"))
        assert not counts.get("intent") and not counts.get("unknown"), counts
        assert counts.get("pending"), counts  # it did stop early
    finally:
        j.close()


def test_jupyter_kernel_interrupt_stops_at_once_then_resumes_paying_once(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """Kernel interrupt: KeyboardInterrupt, at most the in-flight window sent after it; a new call pays rows once."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.05")
    journal = tmp_path / "nb.journal.sqlite"
    kernel = Kernel(tmp_path)
    try:
        cell = kernel.start(call_cell(sp500, journal, emu.base_url, SLOW))
        wait_for(lambda: len(emu.ledger()) >= 2 * WINDOW, timeout=60)
        at_interrupt = len(emu.ledger())
        kernel.km.interrupt_kernel()
        first = ended(kernel.wait(cell, timeout=60))
        created_after = len(emu.ledger()) - at_interrupt
        assert first["raised"] == "KeyboardInterrupt", first
        assert created_after <= WINDOW, f"{created_after} runs were created after the interrupt"
        assert "call enrich_frame again" in first["message"]
        assert_journal_settled(journal)
        second = ended(kernel.wait(kernel.start(call_cell(sp500, journal, emu.base_url, FAST)), timeout=120))
    finally:
        kernel.close()
    assert second == {"raised": None, "completed": 503, "rows": 503, "own_hq": True}
    assert_each_row_once(emu, 503)


def test_script_sigint_raises_keyboard_interrupt_then_resumes_paying_once(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """SIGINT to a script in enrich_frame: it stops sending, exits with KeyboardInterrupt; a new call pays rows once."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.05")
    journal = tmp_path / "nb.journal.sqlite"
    script = tmp_path / "script.py"
    script.write_text(call_cell(sp500, journal, emu.base_url, SLOW).replace("except KeyboardInterrupt", "except ()"))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(emu.ledger()) >= 2 * WINDOW, timeout=60)
        at_interrupt = len(emu.ledger())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    created_after = len(emu.ledger()) - at_interrupt
    assert proc.returncode != 0 and b"KeyboardInterrupt: enrich_frame interrupted" in err, err.decode()[-2000:]
    assert created_after <= WINDOW, f"{created_after} runs were created after SIGINT"
    assert_journal_settled(journal)
    df = pl.read_csv(sp500, infer_schema=False)
    out = enrich.enrich_frame(df, FAST, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234")
    assert (out["_enrich_status"] == "completed").all() and out["Symbol"].to_list() == df["Symbol"].to_list()
    assert_each_row_once(emu, 503)


def test_an_interrupt_while_the_output_is_written_says_how_to_resume_then_resumes_paying_nothing(
    tmp_path: Path, sp500: Path, emulator_process
) -> None:
    """Ctrl-C in the output write (the 2nd atomic write), every row paid: the resume line; a new call pays none."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0.001")
    journal = tmp_path / "nb.journal.sqlite"
    script = tmp_path / "script.py"
    script.write_text(call_cell(sp500, journal, emu.base_url, FAST))
    env = {**os.environ, "ENRICH_FAILPOINT": "mid_write:2:INT"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, env=env, timeout=300)
    first = ended(done.stdout.decode())
    assert first["raised"] == "KeyboardInterrupt", first
    assert "call enrich_frame again" in first["message"] and str(journal) in first["message"], first
    assert_each_row_once(emu, 503)
    again = ended(
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, timeout=300).stdout.decode()
    )
    assert again == {"raised": None, "completed": 503, "rows": 503, "own_hq": True}
    assert_each_row_once(emu, 503)


# ---- the frame comes back as it went in --------------------------------------------------------------


def truth() -> dict[str, str]:
    """Each company's headquarters in the emulator's bundled knowledge table."""
    table = pl.read_csv(ROOT / "enrich/data/companies_knowledge.csv", infer_schema=False)
    known = dict(zip(table["company"], table["headquarters_location"], strict=True))
    return {c: known.get(c) for c in frame()["company"]}  # None: the emulator answers "unknown" (null)


def test_pandas_sorted_frame_keeps_index_dtypes_and_each_rows_answer(tmp_path: Path, emulator) -> None:
    """A sorted pandas frame (named index, Int64/category/string NA) comes back unchanged, answers beside their rows."""
    pd = pytest.importorskip("pandas")
    emu = emulator(time_scale=0.0)
    src = frame().to_pandas()
    n = len(src)
    df = pd.DataFrame(
        {
            "company": pd.array(src["company"], dtype="string[python]"),
            "rank": pd.array([None if i % 7 == 0 else i for i in range(n)], dtype="Int64"),
            "tier": pd.Categorical(["b" if i % 3 else "a" for i in range(n)], categories=["b", "c", "a"]),
            "note": pd.array([None if i % 5 == 0 else f"n{i}" for i in range(n)], dtype="string[python]"),
        },
        index=pd.Index([f"id{i:03d}" for i in range(n)], name="row_id"),
    ).sort_values("company", ascending=False)
    before = df.copy()
    out = enrich.enrich_frame(df, CONFIG, journal=tmp_path / "j.sqlite", base_url=emu.base_url, api_key="sk-nb-1234")
    pd.testing.assert_frame_equal(df, before)  # the caller's frame is not touched
    pd.testing.assert_frame_equal(out[list(df.columns)], df, check_exact=True)  # index, dtypes, values, NA kinds
    assert out.index.name == "row_id" and list(out["tier"].cat.categories) == ["b", "c", "a"]
    assert out["note"].dtype == pd.StringDtype("python") and out["note"].loc["id000"] is pd.NA
    df["hq"] = out["headquarters_location"]  # label-aligned assignment, as users write it
    got = [None if pd.isna(df["hq"][i]) else df["hq"][i] for i in df.index]
    assert got == [truth()[df["company"][i]] for i in df.index]


def test_polars_columns_and_dtypes_come_back_unchanged(tmp_path: Path, emulator) -> None:
    """A polars frame with enum, categorical, small ints, dates, tz datetimes, lists and structs keeps them all."""
    emu = emulator(time_scale=0.0)
    base = frame().head(12)
    n = base.height
    df = base.select("company").with_columns(
        pl.Series("grade", ["x", "y", "z"] * 4, dtype=pl.Enum(["z", "y", "x"])),
        pl.Series("cat", ["p", "q"] * 6, dtype=pl.Categorical),
        pl.Series("small", list(range(n)), dtype=pl.Int8),
        pl.Series("unsigned", [None, *range(1, n)], dtype=pl.UInt16),
        pl.date_range(pl.date(2024, 1, 1), pl.date(2024, 1, n), eager=True).alias("day"),
        pl.Series("at", [None] * n, dtype=pl.Datetime("ms", "Europe/Paris")),
        pl.Series("tags", [[i, i + 1] for i in range(n)], dtype=pl.List(pl.Int32)),
        pl.Series("info", [{"a": i, "b": str(i)} for i in range(n)]),
    )
    out = enrich.enrich_frame(df, CONFIG, journal=tmp_path / "j.sqlite", base_url=emu.base_url, api_key="sk-nb-1234")
    assert out.select(df.columns).equals(df) and out.select(df.columns).schema == df.schema
    assert out["headquarters_location"].to_list() == [truth()[c] for c in df["company"]]


# ---- errors speak of the frame and of enrich_frame's arguments ---------------------------------------


def labelled(pd: Any) -> Any:
    """The companies as a pandas frame indexed by labels id000, id001, ... (0-based positions)."""
    df = frame().head(8).to_pandas()
    df.index = pd.Index([f"id{i:03d}" for i in range(len(df))], name="row_id")
    return df


def test_row_errors_name_the_frames_row_and_index_label(tmp_path: Path) -> None:
    """A null key and a duplicate key are reported by frame row and index label, never by the internal Parquet file."""
    pd = pytest.importorskip("pandas")
    df = labelled(pd)
    df.loc["id003", "company"] = None
    with pytest.raises(InputError) as err:
        enrich.enrich_frame(df, CONFIG, journal=tmp_path / "j.sqlite", emulator=True)
    assert str(err.value) == "the frame, row 3 (index 'id003'): null key in key column(s) ['company']"
    df = labelled(pd)
    df.loc["id005", "company"] = df.loc["id002", "company"]
    with pytest.raises(InputError) as err:
        enrich.enrich_frame(df, CONFIG, journal=tmp_path / "j.sqlite", emulator=True)
    assert str(err.value).startswith("the frame, row 5 (index 'id005'): duplicate key ['Google'] in column(s)")
    assert "(first at row 2 (index 'id002'))" in str(err.value)
    with pytest.raises(InputError) as err:  # polars: a row is its position
        enrich.enrich_frame(frame().with_columns(company=pl.lit("  ")), CONFIG, journal=tmp_path / "p", emulator=True)
    assert str(err.value) == "the frame, row 0: empty key in key column(s) ['company']"


def test_header_errors_name_the_frame(tmp_path: Path) -> None:
    """A missing input column or one that collides with an output column names the frame's column."""
    with pytest.raises(InputError) as err:
        enrich.enrich_frame(frame().drop("company"), CONFIG, journal=tmp_path / "j.sqlite", emulator=True)
    assert str(err.value).startswith("the frame: missing column(s) ['company']")
    clash = frame().with_columns(pl.lit(1).alias("founded_year__confidence"))
    with pytest.raises(InputError) as err:
        enrich.enrich_frame(clash, CONFIG, journal=tmp_path / "j.sqlite", emulator=True)
    assert str(err.value) == (
        "the frame: column founded_year__confidence: input column 'founded_year__confidence' collides with an "
        "output column; rename it"
    )


def test_remedies_are_keyword_arguments_not_flags(tmp_path: Path, emulator, monkeypatch) -> None:
    """No key says api_key=/emulator=True; another job's journal says journal=/adopt=True, and adopt=True works."""
    monkeypatch.delenv("PARALLEL_API_KEY", raising=False)
    monkeypatch.delenv("PARALLEL_API_KEY_FILE", raising=False)
    with pytest.raises(ConfigError) as err:
        enrich.enrich_frame(frame(), CONFIG, journal=tmp_path / "j.sqlite")
    assert "api_key=" in str(err.value) and "emulator=True" in str(err.value) and "--" not in str(err.value)
    emu = emulator(time_scale=0.0)
    journal = tmp_path / "nb.journal.sqlite"
    enrich.enrich_frame(frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234", budget_usd=0.05)
    with pytest.raises(JournalError) as err:
        enrich.enrich_frame(frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-other")
    assert "adopt=True" in str(err.value) and "journal=" in str(err.value) and "--" not in str(err.value)
    out = enrich.enrich_frame(
        frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-other", adopt=True
    )
    assert (out["_enrich_status"] == "completed").all() and runs(emu) == 55


def test_api_lost_mid_job_raises_api_unavailable(tmp_path: Path, emulator) -> None:
    """Creating requests failing for outage_give_up_s mid-job raise ApiUnavailable, the error the job ended with."""
    emu = emulator(time_scale=0.05)
    cfg = {**CONFIG, "limits": {**CONFIG["limits"], "outage_give_up_s": 1, "max_in_flight": 10, "batch_size": 5}}

    def outage_once_runs_exist() -> None:
        wait_for(lambda: runs(emu) >= 10, timeout=30)
        httpx.post(emu.base_url + "/_emulator/faults", json={"faults": "503=1"}, timeout=10)

    faults = threading.Thread(target=outage_once_runs_exist, daemon=True)
    faults.start()
    with pytest.raises(ApiUnavailable) as err:
        enrich.enrich_frame(frame(), cfg, journal=tmp_path / "j.sqlite", base_url=emu.base_url, api_key="sk-nb-1234")
    faults.join(10)
    assert "no creating request succeeded for 1 s" in str(err.value) and "call enrich_frame again" in str(err.value)


def test_payment_required_mid_job_is_raised_as_itself(tmp_path: Path, emulator) -> None:
    """402 once the credit is spent raises the job's own PaymentRequired; the rows paid for are kept for the next call."""
    emu = emulator(time_scale=0.0, credit_usd=0.1)  # 20 lite runs
    cfg = {**CONFIG, "limits": {**CONFIG["limits"], "batch_size": 5}}
    with pytest.raises(PaymentRequired) as err:
        enrich.enrich_frame(frame(), cfg, journal=tmp_path / "j.sqlite", base_url=emu.base_url, api_key="sk-nb-1234")
    assert err.value.status == 402 and runs(emu) == 20
