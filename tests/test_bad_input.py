"""Bad input fails fast and clearly: exit 2, a one-line message naming file and line (or
column), before any API call (the emulator's ledger stays empty)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich.config import load_config
from enrich.errors import InputError
from enrich.journal import Journal
from enrich.pipeline import prepare
from enrich.read import read_csv
from tests.conftest import CANARY_KEY, ROOT, run_enrich, write_config

FIXTURES = ROOT / "tests" / "fixtures" / "bad_input"
CASES = sorted(p.name for p in FIXTURES.iterdir())


@pytest.fixture(scope="module")
def shared_emulator():
    from enrich.emulator import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig(time_scale=0)) as server:
        yield server


@pytest.fixture(scope="module")
def big_cell(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "five_mb_cell.csv"
    path.write_text("company,website,note\nApple,https://www.apple.com," + "x" * (5 << 20) + "\n")
    return path


def _config(tmp_path: Path, src: Path) -> Path:
    return write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company", "website"],
    )


EXPECTED = {  # fixture -> (line or None, what the one-line message must say)
    "binary_png.csv": (1, "invalid utf-8 byte 0x89"),
    "corrupt.parquet": (None, "not a valid Parquet file"),
    "cp1252.csv": (3, "cp1252"),
    "duplicate_columns.parquet": (None, "duplicate column name 'website'"),
    "duplicate_header.csv": (1, "duplicate column name 'company'"),
    "duplicate_key.csv": (4, "duplicate key"),
    "empty.csv": (1, "the file is empty"),
    "empty_header_name.csv": (1, "empty name"),
    "empty_key.csv": (3, "empty key"),
    "header_only.csv": (2, "no data rows"),
    "input_too_large.csv": (2, "exceeds the API's 25,000"),
    "missing_input_column.csv": (1, "missing column(s) ['website']"),
    "missing_key_column.csv": (1, "missing column(s) ['company']"),
    "no_rows.parquet": (None, "has no rows"),
    "nul_byte.csv": (2, "NUL byte"),
    "output_column_collision.csv": (1, "collides with"),
    "ragged_fewer_fields.csv": (3, "row has 2 fields"),
    "ragged_more_fields.csv": (2, "row has 4 fields"),
    "reserved_column.csv": (1, "'_enrich_status' collides"),
    "truncated.parquet": (None, "not a valid Parquet file"),
    "unbalanced_quote.csv": (3, "unbalanced quote"),
    "utf16be.csv": (1, "UTF-16"),
    "utf16le.csv": (1, "UTF-16"),
    "whitespace_key.csv": (3, "empty key"),
}


def test_every_fixture_has_its_expected_message() -> None:
    """Each bad-input fixture is listed with the line and reason its error must name (none unlisted)."""
    assert sorted(EXPECTED) == CASES


@pytest.mark.parametrize("name", [*CASES, "five_mb_cell.csv", "does_not_exist.csv"])
def test_bad_input_exits_2_naming_file_and_line(name: str, tmp_path: Path, shared_emulator, big_cell: Path) -> None:
    src = big_cell if name == "five_mb_cell.csv" else FIXTURES / name
    cfg_path = _config(tmp_path, src)
    # in-process: the reader rejects it with an InputError, quickly (CPU time, not wall clock)
    cfg = load_config(cfg_path)
    journal = Journal.open(tmp_path / "j.sqlite")
    t0 = time.process_time()
    with pytest.raises(InputError) as info:
        prepare(cfg, journal)
    assert time.process_time() - t0 < 1.0
    assert journal.counts() == {}  # nothing recorded
    journal.close()
    message = str(info.value)
    assert message.startswith(str(src))
    if name in EXPECTED:
        line, reason = EXPECTED[name]
        assert reason in message, message
        assert line is None or message.startswith(f"{src}:{line}:"), message
    if name not in ("corrupt.parquet", "truncated.parquet", "no_rows.parquet", "does_not_exist.csv"):
        assert re.match(re.escape(str(src)) + r"(:\d+|: column)", message), message
    # the CLI: exit 2, one line on stderr, nothing sent
    r = run_enrich("run", str(cfg_path), "--base-url", shared_emulator.base_url)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(src) in r.stderr
    assert httpx.get(shared_emulator.base_url + "/_emulator/ledger").json() == []
    assert CANARY_KEY not in r.stderr + r.stdout


def test_bad_input_keeps_the_journal(tmp_path: Path, shared_emulator) -> None:
    """A bad file on a nightly re-run loses nothing already journaled."""
    src = tmp_path / "in.csv"
    src.write_text("company,website\nApple,a\n3M,b\n")
    cfg_path = _config(tmp_path, src)
    assert run_enrich("run", str(cfg_path), "--base-url", shared_emulator.base_url).returncode == 0
    src.write_text("company,website\nApple,a\nApple,b\n")
    r = run_enrich("run", str(cfg_path), "--base-url", shared_emulator.base_url)
    assert r.returncode == 2 and "duplicate key" in r.stderr and ":3" in r.stderr
    j = Journal.open(tmp_path / "out.csv.journal.sqlite", readonly=True)
    assert j.counts() == {"done": 2}
    j.close()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_reader_returns_rows_or_input_error(data: bytes) -> None:
    """Random bytes: the reader yields rows or raises InputError, nothing else."""
    try:
        _, batches = read_csv(io.BytesIO(data), required=[], name="fuzz.csv")
        for batch in batches:
            for row in batch:
                assert isinstance(row.values, list)
    except InputError as exc:
        assert str(exc).startswith("fuzz.csv")


@given(st.lists(st.lists(st.text(max_size=12), min_size=2, max_size=2), min_size=1, max_size=20))
def test_csv_cells_round_trip_as_strings(rows: list[list[str]]) -> None:
    """Whatever text a valid CSV holds comes back unchanged (no type inference, no trimming)."""
    import csv

    rows = [[c.replace("\x00", "") for c in r] for r in rows]
    rows = [r for r in rows if r != ["", ""]] or [["a", "b"]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([["k", "v"], *rows])  # quotes CR and LF
    _, batches = read_csv(io.BytesIO(buf.getvalue().encode()), required=["k"], name="rt.csv")
    got = [row.values for batch in batches for row in batch]
    assert got == rows


def test_a_pipe_as_input_exits_2_naming_it(tmp_path: Path, shared_emulator) -> None:
    """`--input /dev/stdin` fed by a pipe (read twice: fingerprint, then rows) is refused in one line, exit 2."""
    cfg_path = _config(tmp_path, tmp_path / "unused.csv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    args = ["run", str(cfg_path), "--input", "/dev/stdin", "--base-url", shared_emulator.base_url]
    paid = len(httpx.get(shared_emulator.base_url + "/_emulator/ledger").json())  # the module's emulator is shared
    r = subprocess.run(
        [sys.executable, "-m", "enrich", *args],
        input="company,website\nApple,a\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("enrich: error: /dev/stdin: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a regular file" in r.stderr
    assert len(httpx.get(shared_emulator.base_url + "/_emulator/ledger").json()) == paid
