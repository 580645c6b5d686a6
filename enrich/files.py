"""Files: the one owner of atomic writes, sidecar paths, cell encoding and the formula guard.

Everything enrich puts on disk beside an output goes through here, so each rule has one home:

- `atomic_write(path, write)`: a 0600 temp file beside `path`, fsynced, renamed over it, the
  folder fsynced (one durability level for outputs, reports, review and basis files, partition
  plans and slices); `remove_stale_temps` clears what a killed writer left.
- Sidecar names of an output `out/x.enriched.parquet`: `x.enriched.parquet.journal.sqlite`,
  `x.enriched.parquet.report.json`, `x.enriched.report.html`, `x.enriched.review.csv`,
  `x.enriched.basis.parquet` (`.csv` for CSV outputs).
- `encode_cell(value)`: a researched value as one text cell (text as is, None empty, anything
  else JSON, once): CSV outputs, review and basis files use it; Parquet keeps types.
- `neutralize(cell)` (outputs) and `guard`/`unguard` (review files, where the round trip must be
  exact): text a spreadsheet would run as a formula gets a leading `'` in CSV files. `.xlsx` cells
  are written as text cells by the Excel writer, which never evaluates them, so they are not
  prefixed there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from enrich import failpoints

PARQUET_SUFFIXES = (".parquet", ".pq")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an integer output column (Parquet, Arrow, Excel) holds
XLSX_SUFFIXES = (".xlsx",)
OUTPUT_SUFFIXES = (".csv", *PARQUET_SUFFIXES, *XLSX_SUFFIXES)
NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # a decimal number, as text
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\x00")


# -- atomic writes -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temp name a write of `path` by this process uses (`remove_stale_temps` knows it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(fileobj)` on a 0600 temp file beside `path`, fsync, then rename over `path`.

    On any error (a full disk included) the temp file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        failpoints.hit("mid_write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_json(path: Path, data: Any, indent: int = 1) -> None:
    """`data` as sorted JSON, written atomically."""
    atomic_write(path, lambda fp: fp.write(json.dumps(data, indent=indent, sort_keys=True).encode()))


def remove_stale_temps(path: Path) -> int:
    """Delete temp files a killed write or export left beside `path` (their process is gone)."""
    removed = 0
    if not path.parent.is_dir():
        return 0
    for tmp in path.parent.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- sidecar paths -------------------------------------------------------------------------------


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def journal_path(output: Path) -> Path:
    """`out/x.csv` -> `out/x.csv.journal.sqlite`: one per output (x.lite.csv and x.base.csv differ)."""
    return output.with_name(output.name + ".journal.sqlite")


def report_json_path(output: Path) -> Path:
    """`out/x.enriched.parquet` -> `out/x.enriched.parquet.report.json`."""
    return output.with_name(output.name + ".report.json")


def html_report_path(output: Path) -> Path:
    """`out/companies.enriched.parquet` -> `out/companies.enriched.report.html`."""
    return output.with_name(output.stem + ".report.html")


def review_path(output: Path) -> Path:
    """Where the review file of an output goes: `out/x.enriched.parquet` -> `out/x.enriched.review.csv`."""
    return output.with_name(output.stem + ".review.csv")


def pilot_json_path(output: Path) -> Path:
    """Where `enrich pilot` writes its comparison: `out/x.enriched.parquet` -> `out/x.enriched.pilot.json`."""
    return output.with_name(output.stem + ".pilot.json")


def pilot_html_path(output: Path) -> Path:
    """The pilot's page, beside the run report: `out/x.enriched.parquet` -> `out/x.enriched.pilot.html`."""
    return output.with_name(output.stem + ".pilot.html")


def basis_path(output: Path) -> Path:
    """`out/x.enriched.parquet` -> `out/x.enriched.basis.parquet`; CSV outputs get a CSV basis file."""
    return output.with_name(output.stem + ".basis" + (".parquet" if is_parquet(output) else ".csv"))


# -- cells ---------------------------------------------------------------------------------------


def encode_cell(value: Any) -> str:
    """A value as one text cell: text as is, None empty, anything else JSON (once).

    >>> encode_cell("Austin"), encode_cell(1998), encode_cell(["a", {"b": 1}]), encode_cell(None), encode_cell(True)
    ('Austin', '1998', '["a", {"b": 1}]', '', 'true')
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def neutralize(cell: str) -> str:
    """Prefix `'` to text a spreadsheet would run as a formula; numbers stay numbers.

    >>> neutralize("=HYPERLINK(1)"), neutralize("-2"), neutralize("@x"), neutralize("abc")
    ("'=HYPERLINK(1)", '-2', "'@x", 'abc')
    """
    if cell.startswith(_FORMULA_START) and not NUMERIC.match(cell):
        return "'" + cell
    return cell


def guard(cell: str) -> str:
    """`neutralize`, and a `'` before text that already starts with `'`, so `unguard` is exact.

    >>> guard("=SUM(A1)"), guard("-2"), guard("'quoted"), guard("plain")
    ("'=SUM(A1)", '-2', "''quoted", 'plain')
    """
    return "'" + cell if cell.startswith("'") else neutralize(cell)


def unguard(cell: str) -> str:
    """Undo `guard` exactly: `unguard(guard(s)) == s` for every string s.

    >>> unguard("'=SUM(A1)"), unguard("=SUM(A1)"), unguard("'Tis")
    ('=SUM(A1)', '=SUM(A1)', "'Tis")
    """
    if cell.startswith("'") and guard(cell[1:]) == cell:
        return cell[1:]
    return cell
