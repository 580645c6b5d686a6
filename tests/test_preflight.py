"""Check before you pay: every refusal is one line `enrich: error: ...`, exit 2, no traceback,
and the emulator's ledger shows that no paid run was created."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from enrich import preflight, spec
from enrich.cli import main
from enrich.config import load_config
from enrich.emulator.validate import Invalid, validate_run_input
from enrich.errors import ConfigError
from tests.conftest import CANARY_KEY, ROOT

COMPANIES = ["Apple", "Microsoft", "Nvidia"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One emulator for the module: its ledger must stay empty for every refused job."""
    from enrich.emulator import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig(time_scale=0)) as server:
        yield server


def ledger(server: Any) -> list[dict[str, Any]]:
    return httpx.get(server.base_url + "/_emulator/ledger", timeout=10).json()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run `enrich ARGS` in-process; (exit code, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("enrich: error: "), err
    assert "Traceback" not in err and "Input should" not in err and "Value error" not in err, err
    for needle in needles:
        assert needle in err, err


def job(
    tmp: Path,
    *,
    src: Path | None = None,
    out: str = "out.csv",
    fields: str | None = None,
    extra: str = "",
    emulator: str = "time_scale = 0",
) -> Path:
    """A small valid job config in `tmp`; pieces can be swapped to make it bad."""
    if src is None:
        src = tmp / "in.csv"
        src.write_text("company,website\n" + "".join(f"{c},https://{c.lower()}.com\n" for c in COMPANIES))
    fields = fields if fields is not None else '[task.output.hq]\ntype = "string"\n'
    out_path = out if out.startswith("/") else str(tmp / out)
    text = (
        f'[input]\npath = {json.dumps(str(src))}\nkey = ["company"]\n\n[task]\nprocessor = "lite-fast"\n'
        f"{extra}\n{fields}\n[output]\npath = {json.dumps(out_path)}\n\n[limits]\nreconcile_grace_s = 3\nrequest_timeout_s = 2\n\n"
        f"[emulator]\n{emulator}\n"
    )
    cfg = tmp / "job.toml"
    cfg.write_text(text)
    return cfg


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("PARALLEL_", "ENRICH_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PARALLEL_API_KEY", CANARY_KEY)


# ---- 1. one home for the API's rules ---------------------------------------------------------


def test_api_limits_live_only_in_spec_py() -> None:
    """The 25,000/15,000-char limits and the JSON-type picker are defined once, in enrich/spec.py."""
    offenders = []
    for path in (ROOT / "enrich").rglob("*.py"):
        if path.name == "spec.py":
            continue
        text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith(">>>"))
        if re.search(r"\b(25_?000|15_?000)\b", text) or re.search(r"def _(kind|main_type)\(", text):
            offenders.append(path.relative_to(ROOT))
    assert offenders == []


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "unknown type 'strin'"),
        ({"type": "object", "properties": {"a": {"type": "null"}}}, "only 'null'"),
        ({"type": "object", "properties": {"a": {"type": ["null"]}}}, "only 'null'"),
        ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "texte"}}}}, "unknown type"),
    ],
)
def test_config_and_emulator_refuse_the_same_bad_types(tmp_path: Path, schema: dict, needle: str) -> None:
    """A type the API does not accept is refused by the config loader and answered 422 by the emulator."""
    (tmp_path / "s.json").write_text(json.dumps(schema))
    cfg = job(tmp_path, fields="", extra=f"output_schema = {json.dumps(str(tmp_path / 's.json'))}")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(cfg)
    with pytest.raises(Invalid) as info:
        validate_run_input(
            {"input": "x", "processor": "lite", "task_spec": {"output_schema": {"type": "json", "json_schema": schema}}}
        )
    assert info.value.status == 422 and needle in info.value.message


def test_optional_fields_in_anyof_with_null_stay_valid() -> None:
    """pydantic's Optional pattern (anyOf with a null branch) is not a standalone null."""
    schema = {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}
    assert spec.schema_problem(schema) is None
    assert spec.main_type(schema["properties"]["a"]) == "integer"


# ---- 2. preflight through the CLI --------------------------------------------------------------


def test_output_is_a_directory(tmp_path: Path, capsys, keyed, api) -> None:
    """An output path that is a folder is refused before paying (it used to crash in the writer)."""
    (tmp_path / "out.csv").mkdir()
    code, err = cli(capsys, "run", str(job(tmp_path)), "--base-url", api.base_url)
    assert_refused(code, err, "is a directory")
    assert ledger(api) == []


def test_output_folder_is_a_file(tmp_path: Path, capsys, keyed, api) -> None:
    """An output under a path that is a file cannot be written: refused before paying."""
    (tmp_path / "file").write_text("x")
    code, err = cli(
        capsys, "run", str(job(tmp_path, out=str(tmp_path / "file" / "out.csv"))), "--base-url", api.base_url
    )
    assert_refused(code, err, "not a folder")
    assert ledger(api) == []


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc (a folder nobody can create files in)")
def test_output_folder_is_not_writable(tmp_path: Path, capsys, keyed, api) -> None:
    """A folder the writer cannot create files in (even as root) is refused before paying."""
    code, err = cli(
        capsys,
        "run",
        str(job(tmp_path, out="/proc/enrich-out.csv")),
        "--journal",
        str(tmp_path / "j.sqlite"),
        "--base-url",
        api.base_url,
    )
    assert_refused(code, err, "cannot write in /proc")
    assert ledger(api) == []


@pytest.mark.parametrize("name", ["out.txt", "out.json", "out", "out.csv.bak"])
def test_output_extension_unsupported(tmp_path: Path, capsys, keyed, api, name: str) -> None:
    """Only the extensions in config.OUTPUT_SUFFIXES are accepted (".txt" used to become CSV silently)."""
    code, err = cli(
        capsys, "run", str(job(tmp_path, out=name)), "--journal", str(tmp_path / "j.sqlite"), "--base-url", api.base_url
    )
    assert_refused(code, err, "unsupported output extension")
    assert ledger(api) == []


def test_output_is_the_input_via_a_hard_link(tmp_path: Path, capsys, keyed, api) -> None:
    """A second name for the input file is still the input."""
    cfg = job(tmp_path)
    os.link(tmp_path / "in.csv", tmp_path / "alias.csv")
    code, err = cli(capsys, "run", str(cfg), "--output", str(tmp_path / "alias.csv"), "--base-url", api.base_url)
    assert_refused(code, err, "alias.csv: is the input file")
    assert ledger(api) == []


def test_export_refuses_to_overwrite_the_input(tmp_path: Path, capsys, keyed) -> None:
    """`enrich export --output <input>` used to overwrite the input file."""
    cfg = job(tmp_path)
    code, err = cli(capsys, "run", str(cfg), "--emulator")
    assert code == 0, err
    before = (tmp_path / "in.csv").read_bytes()
    code, err = cli(capsys, "export", str(tmp_path / "out.csv.journal.sqlite"), "--output", str(tmp_path / "in.csv"))
    assert_refused(code, err, "is the input file")
    assert (tmp_path / "in.csv").read_bytes() == before


@pytest.mark.parametrize(
    "fields,needle",
    [
        ('[task.output.a]\ntype = "string"\n[task.output.a__confidence]\ntype = "string"\n', "'a__confidence'"),
        (
            '[task.output.x]\ntype = "object"\n[task.output.x.properties.y]\ntype = "string"\n'
            '[task.output."x.y"]\ntype = "string"\n',
            "'x.y'",
        ),
        ('[task.output._enrich_status]\ntype = "string"\n', "reserved"),
        ('[task.output.a]\ntype = "string"\n[task.output.a__citations]\ntype = "string"\n', "'a__citations'"),
    ],
)
def test_output_fields_colliding_with_generated_columns(
    tmp_path: Path, capsys, keyed, api, fields: str, needle: str
) -> None:
    """Two fields that would make the same output column are refused before paying."""
    code, err = cli(capsys, "run", str(job(tmp_path, fields=fields)), "--base-url", api.base_url)
    assert_refused(code, err, needle)
    assert ledger(api) == []


@pytest.mark.parametrize("typ", ["strin", "null", "text"])
def test_field_type_the_api_does_not_accept(tmp_path: Path, capsys, keyed, api, typ: str) -> None:
    """A bad `[task.output.<f>] type` names the key and the allowed types, in plain words."""
    code, err = cli(
        capsys, "run", str(job(tmp_path, fields=f'[task.output.hq]\ntype = "{typ}"\n')), "--base-url", api.base_url
    )
    assert_refused(code, err, "[task.output.hq] type", "must be one of")
    assert ledger(api) == []


@pytest.mark.parametrize(
    "key,kind",
    [
        ("sk-abc\ndef-0123456789", "whitespace"),
        ("sk-abc\u200bdef-0123456789", "U+200B ZERO WIDTH SPACE"),
        ("sk-abc\x07def-0123456789", "control character"),
        ("sk-abc def-0123456789", "whitespace"),
        ("sk-abcé-0123456789", "non-ASCII"),
        ("   ", "only whitespace"),
    ],
)
def test_bad_api_key_refused_without_echoing_it(
    tmp_path: Path, capsys, keyed, monkeypatch, api, key: str, kind: str
) -> None:
    """A key that cannot go in a header is refused, naming the problem but never the key."""
    monkeypatch.setenv("PARALLEL_API_KEY", key)
    code, err = cli(capsys, "run", str(job(tmp_path)), "--base-url", api.base_url)
    assert_refused(code, err, kind)
    assert "0123456789" not in err and "sk-abc" not in err
    assert ledger(api) == []


def test_missing_key_file(tmp_path: Path, capsys, keyed, monkeypatch, api) -> None:
    """A PARALLEL_API_KEY_FILE that does not exist is a one-line error (it used to be a traceback)."""
    monkeypatch.delenv("PARALLEL_API_KEY")
    monkeypatch.setenv("PARALLEL_API_KEY_FILE", str(tmp_path / "nope.key"))
    code, err = cli(capsys, "run", str(job(tmp_path)), "--base-url", api.base_url)
    assert_refused(code, err, "PARALLEL_API_KEY_FILE", "file not found")
    assert ledger(api) == []


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--budget", "inf", "--budget: must be a finite number >= 0"),
        ("--budget", "nan", "--budget: must be a finite number >= 0"),
        ("--budget", "-1", "--budget: must be a finite number >= 0"),
        ("--budget", "ten", "--budget: must be a finite number >= 0"),
        ("--max-in-flight", "0", "--max-in-flight: must be a whole number >= 1"),
        ("--processor", "turbo", "--processor: unknown processor 'turbo'"),
    ],
)
def test_flag_errors_name_the_flag(tmp_path: Path, capsys, keyed, api, flag: str, value: str, needle: str) -> None:
    """A bad flag value is reported under the flag's name, not the config file's, in plain words."""
    code, err = cli(capsys, "run", str(job(tmp_path)), flag, value, "--base-url", api.base_url)
    assert_refused(code, err, needle)
    assert str(tmp_path / "job.toml") not in err
    assert ledger(api) == []


def test_budget_inf_in_the_config_file_is_refused(tmp_path: Path, capsys, keyed, api) -> None:
    """`budget_usd = inf` in TOML would disable the budget: refused, naming the key."""
    cfg = job(tmp_path)
    cfg.write_text(cfg.read_text().replace("[limits]\n", "[limits]\nbudget_usd = inf\n"))
    code, err = cli(capsys, "run", str(cfg), "--base-url", api.base_url)
    assert_refused(code, err, "[limits] budget_usd: must be a finite number")
    assert ledger(api) == []


def test_missing_emulator_knowledge_file(tmp_path: Path, capsys, keyed) -> None:
    """`[emulator] knowledge` naming a missing file is a one-line error (it used to be a traceback)."""
    cfg = job(tmp_path, emulator=f"time_scale = 0\nknowledge = {json.dumps(str(tmp_path / 'nope.csv'))}")
    code, err = cli(capsys, "run", str(cfg), "--emulator")
    assert_refused(code, err, "[emulator] knowledge", "file not found")
    assert not (tmp_path / "out.csv.journal.sqlite").exists()


def test_emulator_command_with_missing_knowledge() -> None:
    """`enrich emulator --knowledge nope.csv` says so (it used to say "cannot listen on ...: None")."""
    proc = subprocess.run(
        [sys.executable, "-m", "enrich", "emulator", "--port", "0", "--knowledge", "nope.csv"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert_refused(proc.returncode, proc.stderr, "--knowledge", "file not found")


# ---- Parquet column types --------------------------------------------------------------------

TYPED = {
    "duration": pa.array([1, 2_000_000_123, None], pa.duration("ns")),
    "time64": pa.array([1, 86_399_999_999_999, None], pa.time64("ns")),
    "map": pa.array([[("a", 1), ("b", 2)], [], None], pa.map_(pa.string(), pa.int64())),
    "binary": pa.array([b"\x00\xff", b"plain", None], pa.binary()),
    "timestamp_ns": pa.array([1, 1_700_000_000_123_456_789, None], pa.timestamp("ns", "Europe/Paris")),
    "nested": pa.array([[{"t": 1}], None, []], pa.list_(pa.struct([("t", pa.duration("ms"))]))),
}


@pytest.mark.parametrize("name", list(TYPED))
def test_parquet_column_types_round_trip(tmp_path: Path, capsys, keyed, name: str) -> None:
    """A passthrough column of this type comes back unchanged, type and values, in Parquet output."""
    table = pa.table({"company": pa.array(COMPANIES), "extra": TYPED[name]})
    pq.write_table(table, tmp_path / "in.parquet")
    cfg = job(tmp_path, src=tmp_path / "in.parquet", out="out.parquet")
    code, err = cli(capsys, "run", str(cfg), "--emulator")
    assert code == 0, err
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.field("extra").type == table.schema.field("extra").type
    assert out.column("extra").combine_chunks().equals(table.column("extra").combine_chunks())
    code, err = cli(capsys, "export", str(tmp_path / "out.parquet.journal.sqlite"), "--output", str(tmp_path / "o.csv"))
    assert code == 0, err


def test_binary_key_column_is_refused_at_read_time(tmp_path: Path, capsys, keyed, api) -> None:
    """Bytes cannot be task input: refused naming the file and the column, before paying."""
    pq.write_table(
        pa.table({"company": pa.array([c.encode() for c in COMPANIES], pa.binary())}), tmp_path / "in.parquet"
    )
    code, err = cli(capsys, "run", str(job(tmp_path, src=tmp_path / "in.parquet")), "--base-url", api.base_url)
    assert_refused(code, err, "in.parquet", "'company'", "binary")
    assert ledger(api) == []


def test_round_trip_helpers_are_inverse() -> None:
    """to_json_values -> JSON -> from_json_values rebuilds each tricky type exactly."""
    from enrich.read import from_json_values, to_json_values

    extra = {
        "date_list": pa.array([[dt.date(2020, 1, 1)], None]),
        "fixed": pa.array([b"ab", None], pa.binary(2)),
        "time32": pa.array([1, None], pa.time32("ms")),
    }
    for arr in [*TYPED.values(), *extra.values()]:
        back = from_json_values(json.loads(json.dumps(to_json_values(arr), default=str)), arr.type)
        assert back.equals(arr), arr.type


# ---- 3. never a traceback ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a journal\n", b"\x00" * 100])
@pytest.mark.parametrize("command", ["status", "export"])
def test_status_and_export_on_a_non_journal(tmp_path: Path, capsys, command: str, content: bytes) -> None:
    """`status`/`export` on an empty or foreign file: one line, exit 2."""
    path = tmp_path / "j.sqlite"
    path.write_bytes(content)
    args = [command, str(path)] + (["--output", str(tmp_path / "o.csv")] if command == "export" else [])
    code, err = cli(capsys, *args)
    assert_refused(code, err, "journal")


def test_plan_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`enrich plan ... | head -1`: when the reader leaves, no traceback and no complaint at exit."""
    cfg = job(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "plan", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before the plan is printed
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(60) == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["emulator", "--port", "99999"], "--port: must be a port number"),
        (["emulator", "--fail-rate", "2"], "--fail-rate: must be between 0 and 1"),
        (["emulator", "--time-scale", "nan"], "--time-scale: must be a finite number"),
        (["run"], "the following arguments are required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    """argparse's usage errors follow the same one-line format (a subprocess: `emulator` would serve)."""
    proc = subprocess.run([sys.executable, "-m", "enrich", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert_refused(proc.returncode, proc.stderr, needle)


# ---- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,ok",
    [("sk-abc", True), ("", False), ("a\tb", False), ("a\u00a0b", False), ("a\x7fb", False), ("K" * 200, True)],
)
def test_api_key_problem(key: str, ok: bool) -> None:
    """Only printable ASCII without spaces can be sent as a key."""
    assert (preflight.api_key_problem(key) is None) is ok


def test_status_on_a_foreign_sqlite_database(tmp_path: Path, capsys) -> None:
    """An SQLite file that is not a journal: one line, exit 2 (today: sqlite3 traceback)."""
    import sqlite3

    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    code, err = cli(capsys, "status", str(path))
    assert_refused(code, err, "journal")
