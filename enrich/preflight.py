"""Check before you pay (conventions.md #18): everything knowable before the first paid request.

`check_job` runs once, after the config is loaded and before the journal is opened or any
request is sent. It refuses, with a `ConfigError` (exit 2) naming the setting, flag or file:

- an API key that is empty or holds whitespace, control or non-ASCII characters (the key
  itself is never shown: only the position and kind of the bad character);
- an output path that is a directory, sits in a folder that cannot be written, has an
  extension no writer handles, or is the input or journal file;
- output fields whose generated columns collide (`a` + `a__confidence`, `x.y` beside an
  object `x` with a property `y`, a field named like `_enrich_status`);
- with `--emulator`, a knowledge table that is missing or lacks its key column.

Input problems (bad rows, column types that cannot be written back) are found by `read.py`
while the input is seeded into the journal, which also happens before any request. So is what
an `.xlsx` output cannot hold unchanged (`SheetFit`: more rows than a sheet has, a cell longer
than Excel's 32,767 characters): `pipeline.prepare` applies it to every row as it streams the
input, so the check costs no second read. The argparse `type=` helpers at the bottom make flag
errors name the flag.
"""

from __future__ import annotations

import csv
import os
import tempfile
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from enrich.config import EMULATOR_KEY, build_task_spec, output_fields, output_format_problem
from enrich.errors import ConfigError, InputError, JournalError, advice
from enrich.files import XLSX_SUFFIXES, encode_cell, is_parquet, report_json_path
from enrich.flatten import META_COLUMNS, output_columns
from enrich.read import Row, TableInfo
from enrich.xlsx import EXCEL_MAX_CELL_CHARS, EXCEL_MAX_ROWS

RESERVED_PREFIX = "_enrich_"  # generated columns (status, error, run id) and any added later
SQLITE_MAGIC = b"SQLite format 3\x00"


# ---- API key -------------------------------------------------------------------------------


def api_key_problem(key: str) -> str | None:
    """What is wrong with an API key, without quoting it; None if it can go in a header.

    >>> api_key_problem("sk-abc"), api_key_problem("")
    (None, 'is empty')
    >>> api_key_problem("sk-a\\u200bbc")
    'contains a non-ASCII character (U+200B ZERO WIDTH SPACE) at position 5'
    """
    if not key:
        return "is empty"
    for i, ch in enumerate(key, 1):
        if ch.isspace() and ch.isascii():
            return f"contains whitespace ({ch!r}) at position {i}"
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"contains a control character (U+{ord(ch):04X}) at position {i}"
        if not ch.isascii():
            name = unicodedata.name(ch, "unnamed")
            return f"contains a non-ASCII character (U+{ord(ch):04X} {name}) at position {i}"
    return None


def _read_key_file(key_file: str) -> str:
    path = Path(key_file)
    try:
        mode = path.stat().st_mode
        if path.is_dir():
            raise ConfigError(f"PARALLEL_API_KEY_FILE: {key_file}: is a directory, not a key file")
        if mode & 0o077:
            raise ConfigError(f"{key_file}: key file must be readable by its owner only (chmod 600)")
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"PARALLEL_API_KEY_FILE: {key_file}: file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"PARALLEL_API_KEY_FILE: {key_file}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"PARALLEL_API_KEY_FILE: {key_file}: cannot read ({exc.strerror})") from None


def resolve_api_key(env: Mapping[str, str], emulated: bool) -> str:
    """The API key from `PARALLEL_API_KEY`, else from the 0600 file named by `PARALLEL_API_KEY_FILE`.

    Surrounding whitespace (a trailing newline from `echo`) is dropped; anything else odd
    is refused by `check_api_key`. Raises ConfigError without ever quoting the key.
    """
    if emulated:
        return EMULATOR_KEY
    raw = env.get("PARALLEL_API_KEY", "")
    key, source = raw.strip(), "PARALLEL_API_KEY"
    if not key and env.get("PARALLEL_API_KEY_FILE"):
        source = f"PARALLEL_API_KEY_FILE ({env['PARALLEL_API_KEY_FILE']})"
        key = _read_key_file(env["PARALLEL_API_KEY_FILE"])
        if not key:
            raise ConfigError(f"{source}: the key file is empty")
    if not key:
        if raw:
            raise ConfigError("PARALLEL_API_KEY is set but holds only whitespace")
        raise ConfigError(
            "PARALLEL_API_KEY is not set; "
            + advice(
                "export it, or add --emulator to run against the bundled emulator (no key, no cost)",
                "export it or pass api_key=, or pass emulator=True to run against the bundled emulator "
                "(no key, no cost)",
            )
        )
    check_api_key(key, source)
    return key


def check_api_key(key: str, source: str = "the API key") -> None:
    """Refuse a key that cannot be sent as-is (it would fail, or be mangled, in the HTTP header)."""
    if (problem := api_key_problem(key)) is not None:
        raise ConfigError(f"{source}: the key {problem} (the key is not shown); copy it again")


# ---- paths ---------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable_folder(path: Path, what: str) -> None:
    """Refuse unless a file can be created beside `path` (its folder, created if missing)."""
    folder = path.parent
    while not folder.exists():  # atomic_write creates missing folders: test the first existing one
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{what} {path}: {folder} is not a folder")
    try:  # os.access() says yes to root even on read-only or virtual file systems: really try
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".enrich-preflight-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def check_output_path(
    output: Path, *, input_path: Path | str | None = None, journal_path: Path | str | None = None, flag: str = "output"
) -> None:
    """Refuse an output path the writer would fail on, or that would overwrite the input or journal."""
    output = Path(output)
    if (problem := output_format_problem(output)) is not None:
        hint = " (a folder output is a Parquet dataset, written with --ray)" if not output.suffix else ""
        raise ConfigError(f"{flag} {output}: {problem}{hint}")
    if output.is_dir():
        raise ConfigError(f"{flag} {output}: is a directory; give a file name")
    if input_path is not None and _same_file(output, Path(input_path)):
        raise ConfigError(f"{flag} {output}: is the input file; choose another output path")
    if journal_path is not None and _same_file(output, Path(journal_path)):
        raise ConfigError(f"{flag} {output}: is the journal file; choose another output path")
    report = report_json_path(output)
    if report.is_dir():
        raise ConfigError(f"{flag} {output}: its report path {report} is a directory")
    _check_writable_folder(output, flag)


def check_journal_file(path: Path | str) -> None:
    """Refuse a path that is not an existing journal (for `status` and `export`)."""
    path = Path(path)
    if path.is_dir():
        raise JournalError(f"{path}: is a directory, not a journal")
    try:
        with path.open("rb") as fp:
            head = fp.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        raise JournalError(f"{path}: no such journal") from None
    except OSError as exc:
        raise JournalError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise JournalError(f"{path}: is empty, not an enrich journal")
    if head != SQLITE_MAGIC:
        raise JournalError(f"{path}: is not an enrich journal (not an SQLite database)")


# ---- output columns ------------------------------------------------------------------------


def column_collision(fields: dict[str, dict[str, Any]]) -> str | None:
    """Why the output fields' generated columns would clash, or None.

    >>> column_collision({"a": {"type": "string"}, "a__confidence": {"type": "string"}})
    "column 'a__confidence' would come from both field 'a' (confidence) and field 'a__confidence' (value)"
    """
    for name in fields:
        if name.startswith(RESERVED_PREFIX):
            return f"field {name!r}: names starting with {RESERVED_PREFIX!r} are reserved for enrich's own columns"
        if not name.strip():
            return "a field has an empty name"
    seen: dict[str, tuple[str, str]] = {c: ("enrich", "status") for c in META_COLUMNS}
    for col, _kind, _schema, field, role in output_columns(fields, reasoning=True):
        if col in seen:
            other, other_role = seen[col]
            return f"column {col!r} would come from both field {other!r} ({other_role}) and field {field!r} ({role})"
        seen[col] = (field, role)
    return None


# ---- what the output format holds ----------------------------------------------------------


class SheetFit:
    """Refuses input an `.xlsx` output could not give back exactly, while the input is read.

    A sheet holds 1,048,576 rows, the header included, and 32,767 characters per cell; the
    writer would cut a longer input cell without a word. `pipeline.prepare` calls `row` for
    every input row (before any request), with the row's JSON text it builds anyway: no cell
    of a row whose JSON fits in one cell can be longer, so most rows cost one `len()`.
    Raises InputError naming the input file, row and column, and what to do instead.
    """

    def __init__(self, output: Path, info: TableInfo):
        self.output, self.path, self.columns = output, info.path, info.columns
        self.rows = 0
        if info.rows is not None and info.rows >= EXCEL_MAX_ROWS:  # Parquet says so before any row is read
            raise InputError(self.path, self._too_many(info.rows))

    def _too_many(self, rows: int | None = None) -> str:
        many = f"{rows:,} data rows" if rows is not None else f"more than {EXCEL_MAX_ROWS - 1:,} data rows"
        return (
            f"{many} do not fit the .xlsx output {self.output} (one sheet holds {EXCEL_MAX_ROWS:,} rows with "
            "the header); write .parquet or .csv output instead (--output ...parquet)"
        )

    def row(self, row: Row, row_json: str) -> None:
        self.rows += 1
        if self.rows >= EXCEL_MAX_ROWS:
            raise InputError(self.path, self._too_many(), line=row.line)
        if len(row_json) <= EXCEL_MAX_CELL_CHARS:
            return
        for name, value in zip(self.columns, row.values, strict=True):
            text = value if isinstance(value, str) else encode_cell(value) if isinstance(value, list | dict) else ""
            if len(text) > EXCEL_MAX_CELL_CHARS:
                raise InputError(
                    self.path,
                    f"cell has {len(text):,} characters; an .xlsx cell holds at most {EXCEL_MAX_CELL_CHARS:,}, so "
                    f"the output {self.output} would cut it: write .parquet or .csv output instead "
                    "(--output ...parquet)",
                    line=row.line,
                    column=name,
                )


def sheet_fit(output: Path, info: TableInfo) -> SheetFit | None:
    """The `.xlsx` limits to check each input row against, or None: CSV and Parquet outputs hold anything."""
    return SheetFit(output, info) if output.suffix.lower() in XLSX_SUFFIXES else None


# ---- emulator ------------------------------------------------------------------------------


def check_knowledge(path: Path | str | None, key: str, where: str = "[emulator] knowledge") -> None:
    """Refuse a knowledge table that is missing, unreadable, or has no `key` column."""
    if path is None:
        return
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: {path}: {'is a directory' if path.is_dir() else 'file not found'}")
    try:
        if is_parquet(path):
            columns = list(pq.read_schema(path).names)
        else:
            with path.open(encoding="utf-8", errors="replace", newline="") as fp:
                columns = next(csv.reader(fp), [])
    except (OSError, ValueError, csv.Error) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{where}: {path}: cannot read ({(str(exc).splitlines() or [''])[0][:120]})") from None
    columns = [c.lstrip("\ufeff") for c in columns]
    if key not in columns:
        raise ConfigError(f"{where}: {path}: key column {key!r} not found (columns: {columns[:10]})")


# ---- the job -------------------------------------------------------------------------------


def check_job(cfg: Any, *, api_key: str | None, emulated: bool, journal_path: Path | None = None) -> None:
    """Every check that can fail before money is spent; raises ConfigError naming what to fix.

    `api_key` None skips the key check (`plan` needs no key). run_job calls it before anything else.
    """
    if api_key is not None and not emulated:
        check_api_key(api_key)
    source = cfg.source or "config"
    jpath = journal_path or cfg.journal_path
    if _same_file(jpath, cfg.input.path):
        raise ConfigError(f"journal {jpath} is the input file; choose another journal path")
    if jpath.is_dir():
        raise ConfigError(f"journal {jpath}: is a directory; give a file name")
    check_output_path(cfg.output.path, input_path=cfg.input.path, journal_path=jpath)
    if not jpath.exists():
        _check_writable_folder(jpath, "journal")
    if (problem := column_collision(output_fields(build_task_spec(cfg)))) is not None:
        raise ConfigError(f"{source}: output fields: {problem}; rename a field")
    if emulated:
        check_knowledge(cfg.emulator.knowledge, cfg.emulator.knowledge_key)
