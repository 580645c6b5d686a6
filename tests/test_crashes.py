"""Crashes and messages (issue 15): the real CLI in its own process against the emulator, ending in one line and a
documented exit code, never a traceback."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xlsxwriter

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


def test_under_nohup_a_sighup_does_not_stop_the_job(tmp_path: Path, emulator_process) -> None:
    """`nohup enrich run ...` (SIGHUP ignored when it starts): a SIGHUP mid-run does not stop the job, exit 0."""
    emu = emulator_process("--time-scale", "0.05")
    cfg = companies_job(tmp_path, limits="batch_size = 5\nmax_in_flight = 10")
    nohup = ["sh", "-c", 'trap "" HUP; exec "$@"', "sh"]  # what nohup does: the ignore is inherited through exec
    proc = subprocess.Popen(
        [*nohup, sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env_with(),
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(emu.ledger()) >= 10, timeout=60)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopping" not in err
    assert statuses(tmp_path / "o.csv") == ["completed"] * ROWS


def test_a_signal_while_the_output_is_written_lets_the_write_finish(tmp_path: Path, emulator_process) -> None:
    """Ctrl-C exactly while a finished job writes its output: no traceback, the output and both reports are
    whole (every row done), the job's own exit code."""
    emu = emulator_process("--time-scale", "0")
    cfg = companies_job(tmp_path)
    env = {**env_with(), "ENRICH_FAILPOINT": "mid_write:1:INT"}  # SIGINT to itself inside the output's write
    r = subprocess.run(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "enrich: stopping" in r.stderr
    assert statuses(tmp_path / "o.csv") == ["completed"] * ROWS
    assert (tmp_path / "o.report.html").stat().st_size > 1000
    assert json.loads((tmp_path / "o.csv.report.json").read_text())["rows"] == ROWS


def test_a_second_signal_during_the_write_leaves_at_once_and_resumes(tmp_path: Path, emulator_process) -> None:
    """Ctrl-C during the run, then again while the partial output is written: exit 75 at once, no torn
    output; the next run finishes with nothing paid twice."""
    emu = emulator_process("--time-scale", "0.05")
    cfg = companies_job(tmp_path, limits="batch_size = 5\nmax_in_flight = 10")
    env = {**env_with(), "ENRICH_FAILPOINT": "after_result_commit:3:INT,mid_write:1:INT"}
    r = subprocess.run(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 75, r.stderr
    assert "Traceback" not in r.stderr and "interrupted again; exiting at once" in r.stderr
    assert not (tmp_path / "o.csv").exists()  # the first write never landed: no torn file
    again = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert again.returncode == 0, again.stderr
    assert statuses(tmp_path / "o.csv") == ["completed"] * ROWS
    assert len(emu.ledger()) == ROWS  # nothing was paid twice
    assert not list(tmp_path.glob(".o.csv.tmp-*"))  # the temp file the exit left was cleaned up


def test_a_signal_while_the_input_is_seeded_leaves_at_once_with_nothing_written(tmp_path: Path) -> None:
    """Ctrl-C while a big input is still being read into the journal (nothing sent yet): exit 75 at once,
    no output written, the journal holds no row (the seeding rolls back), nothing paid."""
    src = tmp_path / "big.csv"
    with src.open("w", encoding="utf-8") as f:
        f.write("company\n")
        f.writelines(f"Company {i}\n" for i in range(200_000))
    cfg = write_config(
        tmp_path / "job.toml", input_path=src, output=tmp_path / "o.csv", key=["company"], columns=["company"]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--emulator"],
        cwd=ROOT,
        env=env_with(),
        stderr=subprocess.PIPE,
        text=True,
    )
    wal = tmp_path / "o.csv.journal.sqlite-wal"  # rows being seeded land here first
    wait_for(lambda: wal.exists() and wal.stat().st_size > 200_000, timeout=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (tmp_path / "o.csv").exists()  # it did not read on and write 200,000 pending rows
    con = sqlite3.connect(tmp_path / "o.csv.journal.sqlite")  # read as SQLite sees it: no row was kept
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "rows" not in tables or con.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 0
    finally:
        con.close()


def test_exit_codes_are_documented_in_the_readme() -> None:
    """Every code in job.EXIT_CODES has a row in the README's exit code table."""
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"\n| {code} | " in readme, code


# ---- a full disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MB file system (tmpfs), so a full disk is a real ENOSPC; skipped where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and mount permission): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the disk is full; returns the filler file (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith("enrich: error:")]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def test_journal_on_a_full_disk_exits_74_and_resumes(tmp_path: Path, small_disk: Path, emulator_process) -> None:
    """The journal's disk fills mid-run: one line (what to free, the journal is safe), exit 74; freed, it resumes
    and finishes without creating any run twice."""
    emu = emulator_process("--time-scale", "0.05")
    cfg = companies_job(tmp_path, limits="batch_size = 5\nmax_in_flight = 10")
    journal = small_disk / "job.sqlite"
    args = ["run", str(cfg), "--base-url", emu.base_url, "--journal", str(journal)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", *args], cwd=ROOT, env=env_with(), stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: len(emu.ledger()) >= 10, timeout=60)
    filler = fill(small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 74, err
    line = one_error_line(err)
    assert f"cannot write {journal}" in line and f"free space on the disk holding {small_disk}" in line
    assert "resumes where it stopped" in line
    assert not (tmp_path / "o.csv").exists()
    filler.unlink()
    again = run_enrich(*args)
    assert again.returncode == 0, again.stderr
    assert statuses(tmp_path / "o.csv") == ["completed"] * ROWS
    refs = [r["metadata"]["enrich_row"] for r in emu.ledger()]
    assert len(refs) == len(set(refs)) == ROWS  # every row paid for exactly once


def test_output_on_a_full_disk_exits_74_and_names_the_output(
    tmp_path: Path, small_disk: Path, emulator_process
) -> None:
    """The output's disk is full: exit 74 and one line naming the output and what to free; freed, the same
    command writes it without a new run."""
    emu = emulator_process("--time-scale", "0")
    output = small_disk / "o.csv"
    cfg = companies_job(tmp_path)
    (tmp_path / "job.toml").write_text(
        (tmp_path / "job.toml").read_text().replace(str(tmp_path / "o.csv"), str(output))
    )
    args = ["run", str(cfg), "--base-url", emu.base_url, "--journal", str(tmp_path / "j.sqlite")]
    filler = fill(small_disk)
    r = run_enrich(*args)
    assert r.returncode == 74, r.stderr
    line = one_error_line(r.stderr)
    assert f"cannot write {output}" in line and "every result is safe in" in line
    runs = len(emu.ledger())
    assert runs == ROWS
    filler.unlink()
    again = run_enrich(*args)
    assert again.returncode == 0, again.stderr
    assert statuses(output) == ["completed"] * ROWS and len(emu.ledger()) == runs


@pytest.mark.parametrize("ext", ["csv", "parquet", "xlsx"])
def test_export_to_a_full_disk_exits_74_naming_the_file(tmp_path: Path, small_disk: Path, emulator, ext: str) -> None:
    """`enrich export --output` onto a full disk: exit 74, one line naming the file, no traceback (not even one
    Python prints while cleaning up)."""
    emu = emulator()
    cfg = companies_job(tmp_path)
    assert run_enrich("run", str(cfg), "--base-url", emu.base_url).returncode == 0
    fill(small_disk)
    target = small_disk / f"x.{ext}"
    r = run_enrich("export", str(tmp_path / "o.csv.journal.sqlite"), "--output", str(target))
    assert r.returncode == 74, r.stderr
    assert f"cannot write {target}" in one_error_line(r.stderr) and "Exception ignored" not in r.stderr


# ---- the API key in messages -------------------------------------------------------------------------


def test_short_key_does_not_garble_messages(tmp_path: Path) -> None:
    """With the README's `PARALLEL_API_KEY=local`, a message about http://localhost keeps its host name."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = companies_job(tmp_path)
    r = run_enrich("run", str(cfg), "--base-url", f"http://localhost:{port}", key="local")
    assert r.returncode == 69, r.stderr
    line = one_error_line(r.stderr)
    assert f"http://localhost:{port}" in line and "REDACTED" not in line


# ---- a server that forgot the job ---------------------------------------------------------------------


def test_restarted_server_recreation_is_said_on_the_console_and_in_status(tmp_path: Path, emulator_process) -> None:
    """Collecting after the emulator restarted re-creates the in-flight runs: stderr and `enrich status` say
    how many and what they cost (runs x price)."""
    first = emulator_process("--time-scale", "5")  # slow: every run is still in flight when it stops
    cfg = companies_job(tmp_path)
    r = run_enrich("run", str(cfg), "--base-url", first.base_url, "--detach")
    assert r.returncode == 0 and f"detached: {ROWS} runs" in r.stderr, r.stderr
    first.stop()
    second = emulator_process("--time-scale", "0")
    r = run_enrich("run", str(cfg), "--base-url", second.base_url)
    assert r.returncode == 0, r.stderr
    cost = f"{ROWS} x $0.0050 = ${ROWS * 0.005:.4f}"  # lite-fast
    warning = [x for x in r.stderr.splitlines() if x.startswith("enrich: warning:")]
    assert len(warning) == 1 and f"creating the {ROWS} runs that were in flight again costs {cost}" in warning[0]
    assert second.base_url in warning[0]
    assert len(second.ledger()) == ROWS
    status = run_enrich("status", str(tmp_path / "o.csv.journal.sqlite"))
    assert status.returncode == 0 and f"re-created   {ROWS} runs" in status.stdout and cost in status.stdout
    assert status_json(tmp_path / "o.csv.journal.sqlite")["recreated"]["runs"] == ROWS


# ---- _enrich_error ------------------------------------------------------------------------------------


def test_failed_escalation_run_says_it_failed(tmp_path: Path) -> None:
    """A row whose stronger processor's run failed (and the job stopped before falling back) says it failed and
    why in `_enrich_error`, not "not finished"."""
    cfg = companies_job(
        tmp_path,
        extra='\n[escalate]\nprocessors = ["base"]\n',
        limits="budget_usd = 0.4",  # the budget ends the job while escalation runs are finishing
        emulator="time_scale = 0\nhard_rate = 0.8\nfail_rate = 0.5",
    )
    r = run_enrich("run", str(cfg), "--emulator")
    assert r.returncode == 4, r.stderr
    with (tmp_path / "o.csv").open(encoding="utf-8", newline="") as f:
        errors = [row["_enrich_error"] for row in csv.DictReader(f)]
    kept = [e for e in errors if e.startswith("kept the best answer so far")]
    failed = [e for e in kept if "run failed: The task run failed: emulated failure" in e]
    assert failed, errors
    # a row still climbing when the budget ended the job says so, with the budget's own line
    assert all("not finished (budget reached: " in e for e in kept if "not finished" in e), kept


# ---- max_attempts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts,code", [(6, 0), (1, 3)])
def test_max_attempts_counts_rejections_of_a_row_sent_alone(tmp_path: Path, attempts: int, code: int) -> None:
    """A row the API rejects (422) when sent alone is sent again until it was rejected `max_attempts` times
    (the default 6 survives a 15% rejection rate; 1 fails a row at its first rejection)."""
    cfg = companies_job(
        tmp_path,
        limits=f"batch_size = 1\nmax_attempts = {attempts}",
        emulator='time_scale = 0\nfaults = "422=0.15"',
    )
    r = run_enrich("run", str(cfg), "--emulator")
    assert r.returncode == code, r.stderr
    rows = statuses(tmp_path / "o.csv")
    assert len(rows) == ROWS
    if attempts == 6:
        assert set(rows) == {"completed"}
    else:
        assert "failed" in rows


# ---- review files as spreadsheets save them -------------------------------------------------------------


@pytest.fixture
def reviewed(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    """A finished emulated job and its review file with two verdicts filled in: (config, review lines)."""
    cfg = companies_job(tmp_path, emulator="time_scale = 0\nhard_rate = 0.5")
    r = run_enrich("run", str(cfg), "--emulator")
    assert r.returncode == 0, r.stderr
    with (tmp_path / "o.review.csv").open(encoding="utf-8", newline="") as f:
        lines = list(csv.reader(f))
    assert len(lines) >= 3, lines
    header = lines[0]
    lines[1][header.index("verdict")] = "accept"
    lines[1][header.index("note")] = "checked — café"  # characters Windows-1252 encodes differently
    lines[2][header.index("verdict")] = "reject"
    return cfg, lines


def save(path: Path, lines: list[list[str]], encoding: str = "utf-8", delimiter: str = ",") -> Path:
    with path.open("w", encoding=encoding, newline="") as f:
        csv.writer(f, delimiter=delimiter, lineterminator="\r\n").writerows(lines)
    return path


def test_review_file_saved_as_windows_1252_names_the_line_and_the_fix(tmp_path: Path, reviewed) -> None:
    """A review file saved as Windows-1252: exit 2, one line naming file and line and how to save it as UTF-8."""
    cfg, lines = reviewed
    path = save(tmp_path / "r.csv", lines, encoding="cp1252")
    r = run_enrich("review", "apply", str(cfg), str(path))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"{path}:2: not UTF-8" in line and "Windows-1252" in line and "'CSV UTF-8 (Comma delimited)'" in line


def test_review_file_saved_as_a_workbook_says_how_to_save_csv(tmp_path: Path, reviewed) -> None:
    """A review file saved as .xlsx (under either name): exit 2 and one line saying to save it as CSV UTF-8."""
    cfg, lines = reviewed
    for name in ("r.xlsx", "r.csv"):
        path = tmp_path / name
        wb = xlsxwriter.Workbook(str(path))
        ws = wb.add_worksheet()
        for i, cells in enumerate(lines):
            for j, cell in enumerate(cells):
                ws.write_string(i, j, cell)
        wb.close()
        r = run_enrich("review", "apply", str(cfg), str(path))
        assert r.returncode == 2
        line = one_error_line(r.stderr)
        assert f"{path}: this is an Excel workbook, not a CSV file" in line and "Save As" in line


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_review_file_separated_by_semicolons_is_applied(tmp_path: Path, reviewed, delimiter: str) -> None:
    """A `;`- (or tab-) separated review file, as spreadsheets in decimal-comma languages save CSV, is applied."""
    cfg, lines = reviewed
    path = save(tmp_path / "r.csv", lines, delimiter=delimiter)
    r = run_enrich("review", "apply", str(cfg), str(path))
    assert r.returncode == 0 and "applied 2 verdicts" in r.stderr, r.stderr


def test_review_file_with_a_cell_over_the_csv_field_limit_is_applied(tmp_path: Path, reviewed) -> None:
    """A note longer than the csv module's default field limit (128 KiB) does not make the file malformed."""
    cfg, lines = reviewed
    lines[2][lines[0].index("note")] = "x" * 200_000
    path = save(tmp_path / "r.csv", lines)
    r = run_enrich("review", "apply", str(cfg), str(path))
    assert r.returncode == 0 and "applied 2 verdicts" in r.stderr, r.stderr


# ---- workbook inputs ------------------------------------------------------------------------------------


def workbook(path: Path, rows: list[tuple[int, list[Any]]]) -> Path:
    """An .xlsx with the given (0-based row, cells) written into its first sheet."""
    wb = xlsxwriter.Workbook(str(path))
    ws = wb.add_worksheet()
    for i, cells in rows:
        ws.write_row(i, 0, cells)
    wb.close()
    return path


def xlsx_job(tmp_path: Path, data: Path) -> Path:
    return write_config(
        tmp_path / "job.toml", input_path=data, output=tmp_path / "o.csv", key=["company"], columns=["company"]
    )


def test_workbook_with_a_title_row_says_where_the_header_is(tmp_path: Path) -> None:
    """A title above the header row: exit 2, one line naming the row the columns are on and what to delete."""
    data = workbook(
        tmp_path / "in.xlsx",
        [(0, ["Companies to research (2024)"]), (2, ["company", "website"]), (3, ["Apple", "apple.com"])],
    )
    r = run_enrich("run", str(xlsx_job(tmp_path, data)), "--emulator")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"{data} [Sheet1] row 1: this is not the header row: the columns company are on row 3" in line
    assert "delete the rows above" in line


def test_workbook_number_beyond_int64_names_its_cell_and_row(tmp_path: Path) -> None:
    """One number >= 2^63 in a column of whole numbers: exit 2, one line naming its cell and row (not polars')."""
    rows: list[tuple[int, list[Any]]] = [(0, ["company", "revenue"])]
    rows += [(i, [f"Company {i}", i * 10]) for i in range(1, 9)]
    rows[5] = (5, ["Company 5", 2**63])
    data = workbook(tmp_path / "in.xlsx", rows)
    r = run_enrich("run", str(xlsx_job(tmp_path, data)), "--emulator")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"{data} [Sheet1] row 6: cell B6 (column 'revenue') holds 9.223372036854776E+18" in line
    assert "f64" not in line and "Format Cells > Text" in line


# ---- config errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,limits,where",
    [
        ('\n[escalate]\nprocessors = ["lite-fast"]\n', "", "[escalate] processors[0]: 'lite-fast' is not on a higher"),
        ('\n[escalate]\nprocessors = ["core"]\non = ["rejected", "nope"]\n', "", "[escalate] on[1]: must be one of"),
        ("", "max_in_flight = 0", "[limits] max_in_flight: must be greater than 0"),
        ("", "", "[gate.fields.nope]: not an output field"),
    ],
)
def test_config_errors_name_the_toml_table_and_key(tmp_path: Path, extra: str, limits: str, where: str) -> None:
    """Config errors point at the setting as the TOML file spells it (`[escalate] processors[0]`), not at
    pydantic's path (`(root): escalate.processors[0]`)."""
    cfg = companies_job(tmp_path, extra=extra, limits=limits)
    if "gate.fields" in where:
        cfg.write_text(cfg.read_text() + '\n[gate.fields.nope]\naccept = ["high"]\n')
    r = run_enrich("run", str(cfg), "--emulator")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert line.startswith(f"enrich: error: {cfg}: {where}") and "(root)" not in line, line


def test_library_job_with_a_closed_stderr_finishes(tmp_path: Path, emulator_process) -> None:
    """`run_job` from Python with sys.stderr closed (not through the CLI's guard): the job still finishes."""
    emu = emulator_process("--time-scale", "0.01")
    cfg = companies_job(tmp_path)
    script = (
        "import os, sys\n"
        "from enrich.config import load_config\n"
        "from enrich.job import run_job\n"
        "cfg = load_config(sys.argv[1], {'api.base_url': sys.argv[2]})\n"
        "closed = open(os.devnull, 'w')\n"
        "closed.close()\n"
        "sys.stderr = closed  # every write to it raises ValueError\n"
        "r = run_job(cfg, api_key=os.environ['PARALLEL_API_KEY'], install_signals=False)\n"
        "print(r.exit_code, r.counts)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(cfg), emu.base_url],
        cwd=ROOT,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"0 {{'done': {ROWS}}}", r.stdout
