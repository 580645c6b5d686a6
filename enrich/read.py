"""Stage 1, read: stream rows from CSV or Parquet in batches, rejecting bad input early.

CSV cells stay strings exactly as written ("02139" stays "02139"); UTF-8 with or without a
BOM. The stdlib `csv` parser is used for CSV because it reports the line of every problem
(polars silently null-fills short rows and renames duplicate headers). Everything this
module rejects raises `InputError(file, line, reason)`, before any API call. Duplicate keys
are detected by the journal while seeding (see journal.seed), which also knows the line of
the first occurrence.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from enrich.errors import InputError

BATCH_ROWS = 5_000
RESERVED_PREFIX = "_enrich_"


@dataclass
class Row:
    line: int                 # 1-based line (CSV: where the record starts), row number (Parquet) or Excel row
    values: list[Any]         # in `TableInfo.columns` order


@dataclass
class TableInfo:
    path: str
    columns: list[str]
    arrow_schema: bytes | None   # serialized pyarrow schema for Parquet input (kept for Parquet output)


def _bom_encoding(head: bytes) -> str | None:
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    return None


def _locate_bad_bytes(raw: bytes, encoding: str) -> tuple[int, int, int]:
    """(line, byte offset, byte value) of the first undecodable byte."""
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as exc:
        return raw.count(b"\n", 0, exc.start) + 1, exc.start, raw[exc.start]
    return 0, 0, 0


class _Lines:
    """Feeds the csv module and remembers how many physical lines it consumed."""

    def __init__(self, text: io.TextIOBase):
        self.text, self.line = text, 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        s = self.text.readline()
        if not s:
            raise StopIteration
        self.line += 1
        return s


def check_columns(path: str, header: list[str], required: list[str], forbidden: set[str]) -> None:
    """Header rules shared by CSV and Parquet: names present, unique, not reserved."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if not name.strip():
            raise InputError(path, f"header column {i} has an empty name", line=1, column=i)
        if name in seen:
            raise InputError(path, f"duplicate column name {name!r} (columns {seen[name]} and {i})", line=1, column=i)
        seen[name] = i
        if name.startswith(RESERVED_PREFIX) or name in forbidden:
            raise InputError(path, f"input column {name!r} collides with an output column; rename it", line=1,
                             column=name)
    missing = [c for c in required if c not in seen]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; the file has {header}", line=1)


def read_csv(source: BinaryIO | Path | str, required: list[str], forbidden: set[str] = frozenset(),
             encoding: str = "utf-8", max_cell_bytes: int = 1 << 20, name: str | None = None,
             batch_rows: int = BATCH_ROWS) -> tuple[TableInfo, Iterator[list[Row]]]:
    """Open a CSV: validate the header now, stream validated rows in batches.

    Raises InputError (here for the header, or from the iterator for a row) naming file and line.
    """
    if isinstance(source, str | Path):
        path = str(source)
        try:
            fp: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed by the iterator
        except OSError as exc:
            raise InputError(path, f"cannot open: {exc.strerror}") from None
    else:
        fp, path = source, name or getattr(source, "name", "<input>")
    head = fp.read(4)
    fp.seek(0)
    if (bom := _bom_encoding(head)) is not None:
        fp.close()
        raise InputError(path, f"file is {bom}-encoded (it starts with a {bom} byte-order mark); "
                               "save it as UTF-8 CSV", line=1)
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    text = io.TextIOWrapper(fp, encoding=enc, errors="strict", newline="")
    lines = _Lines(text)
    csv.field_size_limit(max_cell_bytes)
    reader = csv.reader(lines, strict=True)

    def fail(reason: str, line: int, column: Any = None) -> InputError:
        fp.close()
        return InputError(path, reason, line=line, column=column)

    def decode_error() -> InputError:
        fp.seek(0)
        line, offset, byte = _locate_bad_bytes(fp.read(), enc)
        hint = " (it looks like cp1252/latin-1: re-save as UTF-8 or set input.encoding)" if byte >= 0x80 else ""
        return fail(f"invalid {encoding} byte 0x{byte:02X} at byte offset {offset}{hint}", line)

    def next_record() -> tuple[int, list[str]] | None:
        start = lines.line + 1
        try:
            return start, next(reader)
        except StopIteration:
            return None
        except UnicodeDecodeError:
            raise decode_error() from None
        except csv.Error as exc:
            msg = str(exc)
            if "field larger than field limit" in msg:
                raise fail(f"a cell is larger than the limit of {max_cell_bytes:,} bytes "
                           "(input.max_cell_bytes)", start) from None
            if "unexpected end of data" in msg or "EOF" in msg:
                raise fail("unbalanced quote: a quoted field starting here is never closed", start) from None
            raise fail(f"malformed CSV: {msg}", start) from None

    first = next_record()
    if first is None:
        fp.close()
        raise InputError(path, "the file is empty (no header row)", line=1)
    header = first[1]
    if any("\x00" in h for h in header):
        raise fail("NUL byte in the header row", 1)
    try:
        check_columns(path, header, required, set(forbidden))
    except InputError:
        fp.close()
        raise
    width = len(header)
    max_chars = max_cell_bytes

    def batches() -> Iterator[list[Row]]:
        batch: list[Row] = []
        n = 0
        try:
            while (rec := next_record()) is not None:
                start, values = rec
                if not values:  # a blank line: skipped, as every spreadsheet does
                    continue
                if len(values) != width:
                    raise fail(f"row has {len(values)} fields, the header has {width}", start)
                for i, v in enumerate(values):
                    if "\x00" in v:
                        raise fail("NUL byte in a cell (is this a binary or UTF-16 file?)", start, header[i])
                    if len(v) > max_chars and len(v.encode()) > max_cell_bytes:
                        raise fail(f"cell is larger than {max_cell_bytes:,} bytes", start, header[i])
                batch.append(Row(start, values))
                n += 1
                if len(batch) >= batch_rows:
                    yield batch
                    batch = []
            if batch:
                yield batch
            if n == 0:
                raise fail("the file has a header but no data rows", 2)
        finally:
            fp.close()

    return TableInfo(path, header, None), batches()


def read_parquet(path: Path | str, required: list[str], forbidden: set[str] = frozenset(),
                 batch_rows: int = BATCH_ROWS) -> tuple[TableInfo, Iterator[list[Row]]]:
    """Open a Parquet file and stream its rows; reject unreadable or ambiguous files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spath = str(path)
    try:
        pf = pq.ParquetFile(spath)
        schema = pf.schema_arrow
    except FileNotFoundError:
        raise InputError(spath, "file not found") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(spath, f"not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None
    names = list(schema.names)
    for i, f in enumerate(schema):
        if f.name in names[:i]:
            raise InputError(spath, f"duplicate column name {f.name!r}", column=f.name)
    check_columns(spath, names, required, set(forbidden))

    def batches() -> Iterator[list[Row]]:
        n = 0
        if pf.metadata.num_rows == 0:
            raise InputError(spath, "the file has no rows")
        try:
            for rb in pf.iter_batches(batch_size=batch_rows):
                cols = [c.to_pylist() for c in rb.columns]
                rows = [Row(n + i + 1, list(vals)) for i, vals in enumerate(zip(*cols, strict=True))]
                n += len(rows)
                yield rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(spath, f"corrupt Parquet data near row {n + 1} ({str(exc)[:120]})") from None

    return TableInfo(spath, names, schema.serialize().to_pybytes()), batches()


def open_table(path: Path | str, required: list[str], forbidden: set[str] = frozenset(), encoding: str = "utf-8",
               max_cell_bytes: int = 1 << 20, batch_rows: int = BATCH_ROWS,
               sheet: str | int | None = None) -> tuple[TableInfo, Iterator[list[Row]]]:
    """Dispatch on the extension: .parquet/.pq -> Parquet, .xlsx -> one sheet (`sheet`), anything else -> CSV."""
    p = Path(path)
    if p.is_dir():
        raise InputError(str(p), "is a directory, not a file")
    if p.suffix.lower() in (".parquet", ".pq"):
        return read_parquet(p, required, forbidden, batch_rows)
    if p.suffix.lower() == ".xlsx":
        from enrich.xlsx import read_xlsx

        return read_xlsx(p, required, forbidden, sheet, batch_rows)
    return read_csv(p, required, forbidden, encoding, max_cell_bytes, batch_rows=batch_rows)


def key_problem(values: list[Any]) -> str | None:
    """Why a row's key cannot identify it, or None: `key_problem(['  '])` -> 'empty key'."""
    for v in values:
        if v is None:
            return "null key"
        if isinstance(v, str) and not v.strip():
            return "empty key"
    return None
