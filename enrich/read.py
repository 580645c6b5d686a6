"""Stage 1, read: stream rows from CSV, Parquet or one .xlsx sheet in batches, rejecting bad input early.

CSV cells stay strings exactly as written ("02139" stays "02139"); UTF-8 with or without a
BOM. The stdlib `csv` parser is used for CSV because it reports the line of every problem
(polars silently null-fills short rows and renames duplicate headers). Everything this
module rejects raises `InputError(file, line, reason)`, before any API call. Duplicate keys
are detected by the journal while seeding (see journal.seed), which also knows the line of
the first occurrence.
"""

from __future__ import annotations

import base64
import codecs
import csv
import io
import json
import re
import sys
import zipfile
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from xml.etree import ElementTree

import fastexcel
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from enrich.errors import ConfigError, InputError, SheetPath
from enrich.files import PARQUET_SUFFIXES

BATCH_ROWS = 5_000
RESERVED_PREFIX = "_enrich_"


@dataclass
class Row:
    line: int  # 1-based line (CSV: where the record starts), row number (Parquet) or Excel row
    values: list[Any]  # in `TableInfo.columns` order


@dataclass
class TableInfo:
    path: str
    columns: list[str]
    arrow_schema: bytes | None  # serialized pyarrow schema for Parquet input (kept for Parquet output)
    rows: int | None = None  # data rows, when the file says so before it is read (Parquet metadata)
    formats: dict[str, str | int] | None = None  # .xlsx input: each column's number format (kept for .xlsx output)


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
            raise InputError(
                path, f"input column {name!r} collides with an output column; rename it", line=1, column=name
            )
    missing = [c for c in required if c not in seen]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; the file has {header}", line=1)


def read_csv(
    source: BinaryIO | Path | str,
    required: list[str],
    forbidden: AbstractSet[str] = frozenset(),
    encoding: str = "utf-8",
    max_cell_bytes: int = 1 << 20,
    name: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> tuple[TableInfo, Iterator[list[Row]]]:
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
        fp, path = source, str(name or getattr(source, "name", "<input>"))
    head = fp.read(4)
    fp.seek(0)
    if (bom := _bom_encoding(head)) is not None:
        fp.close()
        raise InputError(
            path, f"file is {bom}-encoded (it starts with a {bom} byte-order mark); save it as UTF-8 CSV", line=1
        )
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
                raise fail(
                    f"a cell is larger than the limit of {max_cell_bytes:,} bytes (input.max_cell_bytes)", start
                ) from None
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


# ---- Parquet values <-> JSON ------------------------------------------------------------
# Input rows travel through the journal as JSON, and the Parquet writer rebuilds each input
# column with its original Arrow type. Most types survive that trip as Python values; the
# ones below do not (nanosecond precision, durations, times of day, bytes, maps, and any
# nested type holding one), so they are carried in an exact JSON form instead:
#   timestamp[ms|ns], time32/64 -> their ISO text     duration -> integer count of its unit
#   binary                      -> base64 text         map      -> [{"key": k, "value": v}, ...]
# `to_json_values` and `from_json_values` are inverses; read_parquet checks that on the first
# batch of every non-plain column and refuses the file (naming the column) if they are not.


def _binary_like(t: Any) -> bool:
    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t))


def _list_like(t: Any) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _needs_codec(t: Any) -> bool:
    """True if a column of type `t` does not survive to_pylist -> JSON -> pa.array unchanged."""
    if pa.types.is_timestamp(t):
        return t.unit in ("ms", "ns")  # s and us round-trip through datetime and its text
    if pa.types.is_time(t) or pa.types.is_duration(t) or _binary_like(t) or pa.types.is_map(t):
        return True
    if pa.types.is_dictionary(t):
        return _needs_codec(t.value_type)
    if _list_like(t):
        return _needs_codec(t.value_type)
    if pa.types.is_struct(t):
        return any(_needs_codec(f.type) for f in t)
    return False


def unsupported_type(t: Any) -> bool:
    """True for Arrow types enrich cannot carry through the journal at all (unions, views, extensions)."""
    if pa.types.is_dictionary(t):
        return unsupported_type(t.value_type)
    if _list_like(t):
        return unsupported_type(t.value_type)
    if pa.types.is_map(t):
        return unsupported_type(t.key_type) or unsupported_type(t.item_type)
    if pa.types.is_struct(t):
        return any(unsupported_type(f.type) for f in t)
    plain = (
        pa.types.is_null,
        pa.types.is_boolean,
        pa.types.is_integer,
        pa.types.is_floating,
        pa.types.is_decimal,
        pa.types.is_date,
        pa.types.is_timestamp,
        pa.types.is_time,
        pa.types.is_duration,
        pa.types.is_string,
        pa.types.is_large_string,
        _binary_like,
    )
    return isinstance(t, pa.ExtensionType) or not any(check(t) for check in plain)


def _encode(arr: Any) -> Any:
    """An Arrow array whose `to_pylist()` is JSON-exact for `arr` (see the table above)."""
    t = arr.type
    if not _needs_codec(t):
        return arr
    if arr.offset:
        arr = pa.concat_arrays([arr])  # children below are addressed from offset 0
    if pa.types.is_dictionary(t):
        return _encode(arr.dictionary_decode())
    if pa.types.is_timestamp(t) or pa.types.is_time(t):
        return arr.cast(pa.string())
    if pa.types.is_duration(t):
        return arr.cast(pa.int64())
    if _binary_like(t):
        return pa.array(
            [None if v is None else base64.b64encode(v).decode("ascii") for v in arr.to_pylist()], pa.string()
        )
    mask = arr.is_null()
    if pa.types.is_fixed_size_list(t):
        arr = arr.cast(pa.list_(t.value_field))
    if _list_like(arr.type):
        cls = pa.LargeListArray if pa.types.is_large_list(arr.type) else pa.ListArray
        return cls.from_arrays(arr.offsets, _encode(arr.values), mask=mask)
    if pa.types.is_struct(t):
        children = [_encode(arr.field(i)) for i in range(t.num_fields)]
        return pa.StructArray.from_arrays(
            children, fields=[pa.field(f.name, c.type) for f, c in zip(t, children, strict=True)], mask=mask
        )
    entries = pa.StructArray.from_arrays([_encode(arr.keys), _encode(arr.items)], names=["key", "value"])
    return pa.ListArray.from_arrays(arr.offsets, entries, mask=mask)


class _NoPandas:
    """A meta-path finder that fails imports of pandas while pyarrow probes for it (see skip_pandas_probe)."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("enrich: pyarrow's pandas probe skipped")


def skip_pandas_probe() -> None:
    """Spare a process that never hands pyarrow a pandas object the ~0.5 s of importing pandas.

    The first `pa.array(values, type=...)` asks whether pandas is installed by importing it; this runs that
    first probe with pandas hidden, so pyarrow records "no pandas" for the probe only. Anything that does need
    pandas later (`import pandas`, `Table.to_pandas`, which retries the import) works as usual. No-op once
    pandas is imported (a notebook)."""
    if "pandas" in sys.modules:
        return
    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([], pa.int64())
    finally:
        sys.meta_path.remove(_NoPandas)


def to_json_values(arr: Any) -> list[Any]:
    """The Python values of an Arrow column, in a form JSON carries exactly (see `from_json_values`)."""
    return list(_encode(arr).to_pylist())


def _leaf(values: list[Any], t: Any) -> Any:
    """A column of a plain type; values that went through JSON as text (dates, decimals) are cast back."""
    try:
        return pa.array(values, type=t)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string()).cast(t)


def _offsets(values: list[Any]) -> tuple[list[int], list[Any], Any]:
    """(offsets, flattened items, null mask) of a column of lists."""
    offsets: list[int] = [0]
    flat: list[Any] = []
    for v in values:
        flat.extend(v or ())
        offsets.append(len(flat))
    return offsets, flat, pa.array([v is None for v in values], pa.bool_())


def from_json_values(values: list[Any], t: Any) -> Any:
    """Rebuild an Arrow column of type `t` from `to_json_values` output that went through JSON.

    Raises pyarrow errors for values that do not fit `t` (never for the output of to_json_values).
    """
    if pa.types.is_dictionary(t):
        return from_json_values(values, t.value_type).dictionary_encode().cast(t)
    if pa.types.is_timestamp(t) and t.unit in ("ms", "ns"):
        return pa.array(values, pa.string()).cast(t)
    if pa.types.is_time(t):
        stamp = pa.timestamp("s" if t.unit == "s" else t.unit)
        text = [None if v is None else f"1970-01-01 {v}" for v in values]
        return pa.array(text, pa.string()).cast(stamp).cast(t)
    if pa.types.is_duration(t):
        return pa.array(values, pa.int64()).cast(t)
    if _binary_like(t):
        return pa.array([None if v is None else base64.b64decode(v) for v in values], t)
    if _list_like(t) or pa.types.is_map(t):
        offsets, flat, mask = _offsets(values)
        if pa.types.is_map(t):
            keys = from_json_values([e["key"] for e in flat], t.key_type)
            items = from_json_values([e["value"] for e in flat], t.item_type)
            return pa.MapArray.from_arrays(pa.array(offsets, pa.int32()), keys, items, type=t, mask=mask)
        if pa.types.is_fixed_size_list(t):
            padded = [v if v is not None else [None] * t.list_size for v in values]
            child = from_json_values([x for v in padded for x in v], t.value_type)
            return pa.FixedSizeListArray.from_arrays(child, type=t, mask=mask)
        child = from_json_values(flat, t.value_type)
        cls, width = (pa.LargeListArray, pa.int64()) if pa.types.is_large_list(t) else (pa.ListArray, pa.int32())
        return cls.from_arrays(pa.array(offsets, width), child, type=t, mask=mask)
    if pa.types.is_struct(t):
        mask = pa.array([v is None for v in values], pa.bool_())
        children = [from_json_values([None if v is None else v.get(f.name) for v in values], f.type) for f in t]
        return pa.StructArray.from_arrays(children, fields=list(t), mask=mask)
    return _leaf(values, t)


def _round_trip_problem(arr: Any) -> str | None:
    """Why a column would not be written back unchanged (checked on a sample before any API call)."""
    try:
        back = from_json_values(json.loads(json.dumps(to_json_values(arr), default=str)), arr.type)
    except (pa.ArrowException, TypeError, ValueError, KeyError, AttributeError) as exc:
        return str(exc).splitlines()[0][:120]
    return None if back.equals(arr) else "values change on the way through the journal"


def read_parquet(
    path: Path | str, required: list[str], forbidden: AbstractSet[str] = frozenset(), batch_rows: int = BATCH_ROWS
) -> tuple[TableInfo, Iterator[list[Row]]]:
    """Open a Parquet file and stream its rows; reject unreadable or ambiguous files."""
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
    for f in schema:
        if unsupported_type(f.type):
            raise InputError(
                spath,
                f"column {f.name!r} has type {f.type}, which enrich cannot write back "
                "unchanged; cast it to a plain type first",
                column=f.name,
            )
        if f.name in required and (_binary_like(f.type) or pa.types.is_map(f.type)):
            raise InputError(
                spath,
                f"column {f.name!r} has type {f.type}, which cannot be sent to the API as "
                "task input; cast it to string or leave it out of input.key/input.columns",
                column=f.name,
            )
    checked = {f.name for f in schema if not _needs_codec(f.type) and not pa.types.is_nested(f.type)}

    def batches() -> Iterator[list[Row]]:
        n = 0
        if pf.metadata.num_rows == 0:
            raise InputError(spath, "the file has no rows")
        try:
            for rb in pf.iter_batches(batch_size=batch_rows):
                for name, col in zip(names, rb.columns, strict=True):
                    if name not in checked:  # the first batch is the sample: before any row is seeded
                        if (problem := _round_trip_problem(col)) is not None:
                            raise InputError(
                                spath,
                                f"column {name!r} ({col.type}) cannot be carried through "
                                f"unchanged ({problem}); cast it to a plain type first",
                                column=name,
                            )
                        checked.add(name)
                cols = [to_json_values(c) for c in rb.columns]
                rows = [Row(n + i + 1, list(vals)) for i, vals in enumerate(zip(*cols, strict=True))]
                n += len(rows)
                yield rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(spath, f"corrupt Parquet data near row {n + 1} ({str(exc)[:120]})") from None

    return TableInfo(spath, names, schema.serialize().to_pybytes(), pf.metadata.num_rows), batches()


def open_table(
    path: Path | str,
    required: list[str],
    forbidden: AbstractSet[str] = frozenset(),
    encoding: str = "utf-8",
    max_cell_bytes: int = 1 << 20,
    batch_rows: int = BATCH_ROWS,
    sheet: str | int | None = None,
) -> tuple[TableInfo, Iterator[list[Row]]]:
    """Dispatch on the extension: .parquet/.pq -> Parquet, .xlsx -> one sheet (`sheet`), anything else -> CSV."""
    p = Path(path)
    if p.is_dir():
        raise InputError(str(p), "is a directory, not a file")
    if p.exists() and not p.is_file():  # the job reads it twice (its fingerprint, then its rows)
        raise InputError(str(p), "is not a regular file (a pipe or a device); save the data to a file and give that")
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return read_parquet(p, required, forbidden, batch_rows)
    if p.suffix.lower() == ".xlsx":
        return read_xlsx(p, required, forbidden, sheet, batch_rows)
    return read_csv(p, required, forbidden, encoding, max_cell_bytes, batch_rows=batch_rows)


class RowFilter:
    """`[input] where`: a polars SQL expression over the input's columns; only rows it makes true are researched.

    Checked when the input is opened, before anything is sent: an expression that does not parse, or names a
    column the input lacks, is a ConfigError (exit 2) naming the expression and the column. It is evaluated on
    each batch of rows; an empty cell is NULL, and CSV cells are text (compare numbers with `CAST(col AS DOUBLE)`).
    A row for which it is false or NULL is not selected.

    >>> f = RowFilter("hq IS NULL AND country = 'US'", ["name", "hq", "country"], text_cells=True)
    >>> f.mask([Row(2, ["a", "", "US"]), Row(3, ["b", "Paris", "FR"]), Row(4, ["c", "", "FR"])])
    [True, False, False]
    """

    def __init__(self, expression: str, columns: list[str], text_cells: bool, source: str = ""):
        self.expression, self.text_cells = expression, text_cells
        self.where = f"{source + ': ' if source else ''}[input] where = {json.dumps(expression)}"
        try:
            expr = pl.sql_expr(expression)
            names = list(dict.fromkeys(expr.meta.root_names()))
        except (pl.exceptions.PolarsError, ValueError, TypeError) as exc:
            raise ConfigError(f"{self.where}: not a valid SQL expression ({_first_line(exc)})") from None
        if unknown := [n for n in names if n not in columns]:
            raise ConfigError(
                f"{self.where}: unknown column {unknown[0]!r}; the input's columns are "
                + ", ".join(repr(c) for c in columns)
            )
        self.expr = expr
        self.used = [(n, columns.index(n)) for n in names]

    def mask(self, rows: list[Row]) -> list[bool]:
        """Which of `rows` the expression selects (True only where it is true)."""
        data: dict[str, list[Any]] = {
            name: [(None if self.text_cells and r.values[i] == "" else r.values[i]) for r in rows]
            for name, i in self.used
        }
        frame = pl.DataFrame(data or {"__row": list(range(len(rows)))}, strict=False)
        try:
            out = frame.with_columns(self.expr.alias("__selected"))["__selected"]
        except (pl.exceptions.PolarsError, ValueError, TypeError) as exc:
            hint = (
                "; CSV cells are text: compare numbers with CAST(column AS DOUBLE)"
                if self.text_cells and "compare string" in str(exc)
                else ""
            )
            raise ConfigError(f"{self.where}: cannot be evaluated ({_first_line(exc)}){hint}") from None
        if out.dtype not in (pl.Boolean, pl.Null):
            raise ConfigError(f"{self.where}: gives {out.dtype} values, not true or false")
        return [v is True for v in out.to_list()]


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def key_problem(values: list[Any]) -> str | None:
    """Why a row's key cannot identify it, or None: `key_problem(['  '])` -> 'empty key'."""
    for v in values:
        if v is None:
            return "null key"
        if isinstance(v, str) and not v.strip():
            return "empty key"
    return None


# ---- .xlsx input --------------------------------------------------------------------------------
# Read with polars' calamine engine (fastexcel): fast, no openpyxl, and cell types survive (numbers
# stay numbers, dates stay dates; they reach the output with their types through the same Arrow
# schema the Parquet reader records). Row numbers in errors are the ones Excel shows
# (`companies.xlsx [Sheet1] row 57: ...`), found from the sheet XML because calamine trims leading
# empty rows. Each column's number format (`0%`, `$#,##0.00`, `hh:mm`) is read from the sheet XML
# too (`number_formats`), so an .xlsx output shows the input columns as the input did.

_KEPT_TYPES = ("Int64", "Float64", "Boolean", "Date", "Datetime", "Duration", "String")
_NS = {
    "m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
    "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
    "p": "http://schemas.openxmlformats.org/package/2006/relationships",
}


def _member(target: str) -> str:
    """The zip member a workbook relationship target names (relative to xl/, or absolute)."""
    return target.lstrip("/") if target.startswith("/") else f"xl/{target}"


def _sheet_member(z: zipfile.ZipFile, sheet: str) -> str | None:
    """The zip member holding the XML of the sheet named `sheet`, or None."""
    wb = ElementTree.fromstring(z.read("xl/workbook.xml"))
    rid = next(
        (s.get(f"{{{_NS['r']}}}id") for s in wb.iterfind("m:sheets/m:sheet", _NS) if s.get("name") == sheet),
        None,
    )
    rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    target = next((r.get("Target") for r in rels.iterfind("p:Relationship", _NS) if r.get("Id") == rid), None)
    return _member(target) if target else None


def _has_value(cell: Any) -> bool:
    return cell.find("m:v", _NS) is not None or cell.find("m:is", _NS) is not None


def _header_row_number(path: str, sheet: str) -> int:
    """The Excel row number of the first row holding a value (calamine starts its range there); 1 if unknown."""
    try:
        with zipfile.ZipFile(path) as z:
            member = _sheet_member(z, sheet)
            if member is None:
                return 1
            with z.open(member) as fp:
                for _, el in ElementTree.iterparse(fp):
                    if el.tag == f"{{{_NS['m']}}}row":
                        if any(_has_value(c) for c in el.iterfind("m:c", _NS)):
                            return int(el.get("r", "1"))
                        el.clear()
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, ElementTree.ParseError):
        pass
    return 1


_TOO_BIG = re.compile(r"conversion from `f64` to `i64` failed in column '([^']*)'")
HEADER_SEARCH_ROWS = 50  # rows searched for the real header when the first row is not it


def _header_below(reader: Any, sheet: str, required: list[str]) -> int | None:
    """How many rows below the first one the row holding every required column name is (None: not near the top)."""
    try:
        rows = reader.load_sheet(sheet, header_row=None, n_rows=HEADER_SEARCH_ROWS, dtypes="string").to_polars()
    except Exception:  # only a better message is at stake: the caller re-raises its own error
        return None
    for i, values in enumerate(rows.iter_rows()):
        if i and all(c in values for c in required):
            return i
    return None


def _too_big_cell(path: str, sheet: str, top: int, column: str) -> tuple[str, int, str] | None:
    """(cell reference, row, value) of the first number in `column` (named in header row `top`) that no
    64-bit integer holds, read from the sheet's XML; None when it cannot be found."""
    try:
        with zipfile.ZipFile(path) as z:
            strings: list[str] = []
            if "xl/sharedStrings.xml" in z.namelist():
                with z.open("xl/sharedStrings.xml") as fp:
                    for _, el in ElementTree.iterparse(fp):
                        if el.tag == f"{{{_NS['m']}}}si":
                            strings.append("".join(t.text or "" for t in el.iter(f"{{{_NS['m']}}}t")))
                            el.clear()
            member = _sheet_member(z, sheet)
            if member is None:
                return None
            letters: set[str] = set()
            with z.open(member) as fp:
                for _, el in ElementTree.iterparse(fp):
                    if el.tag != f"{{{_NS['m']}}}row":
                        continue
                    row = int(el.get("r", "0"))
                    for c in el.iterfind("m:c", _NS):
                        ref, kind, v = c.get("r", ""), c.get("t", "n"), c.find("m:v", _NS)
                        text = v.text if v is not None and v.text is not None else None
                        col = ref.rstrip("0123456789")
                        if row == top:
                            name = strings[int(text)] if kind == "s" and text else text
                            if kind == "inlineStr":
                                name = "".join(t.text or "" for t in c.iter(f"{{{_NS['m']}}}t"))
                            if name == column:
                                letters.add(col)
                        elif row > top and col in letters and kind == "n" and text and abs(float(text)) >= 2**63:
                            return ref, row, text
                    el.clear()
    except (KeyError, OSError, ValueError, IndexError, zipfile.BadZipFile, ElementTree.ParseError):
        return None
    return None


_CELL_REF = re.compile(r"^([A-Z]+)(\d+)$")
FORMAT_SAMPLE_ROWS = 100  # data rows searched for each column's first formatted cell


def _column_index(ref: str) -> int | None:
    """0-based column of a cell reference: `_column_index("AB7")` -> 27."""
    m = _CELL_REF.match(ref)
    if m is None:
        return None
    n = 0
    for ch in m.group(1):
        n = n * 26 + ord(ch) - 64
    return n - 1


def _styles(z: zipfile.ZipFile) -> tuple[dict[int, str], list[int]]:
    """(custom number format id -> format code, number format id of each cell style) from the styles part."""
    rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    target = next(
        (r.get("Target") for r in rels.iterfind("p:Relationship", _NS) if (r.get("Type") or "").endswith("/styles")),
        "styles.xml",
    )
    styles = ElementTree.fromstring(z.read(_member(target or "styles.xml")))
    codes = {
        int(f.get("numFmtId", "0")): f.get("formatCode") or "General"
        for f in styles.iterfind("m:numFmts/m:numFmt", _NS)
    }
    return codes, [int(x.get("numFmtId", "0")) for x in styles.iterfind("m:cellXfs/m:xf", _NS)]


def number_formats(path: str, sheet: str, header_row: int, header: list[str]) -> dict[str, str | int]:
    """Each column's Excel number format, from its first data cell that has one: a format code
    (`$#,##0.00`) or the id of a built-in format (9 is `0%`). General columns are left out; {} if the
    workbook cannot tell. Reads the sheet XML only down to `FORMAT_SAMPLE_ROWS` data rows."""
    found: dict[int, str | int] = {}
    try:
        with zipfile.ZipFile(path) as z:
            member = _sheet_member(z, sheet)
            if member is None:
                return {}
            codes, xfs = _styles(z)
            first: int | None = None
            with z.open(member) as fp:
                for _, el in ElementTree.iterparse(fp):
                    if el.tag != f"{{{_NS['m']}}}row":
                        continue
                    r = int(el.get("r", "0"))
                    cells = [(_column_index(c.get("r", "")), c) for c in el.iterfind("m:c", _NS) if _has_value(c)]
                    if r == header_row:
                        first = min((j for j, _ in cells if j is not None), default=None)
                    elif r > header_row and first is not None:
                        for j, c in cells:
                            style = int(c.get("s", "0"))
                            if j is None or j - first in found or style >= len(xfs) or xfs[style] == 0:
                                continue
                            found[j - first] = codes.get(xfs[style], xfs[style])
                    el.clear()
                    if r >= header_row + FORMAT_SAMPLE_ROWS or len(found) == len(header):
                        break
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, ElementTree.ParseError):
        return {}
    return {header[j]: f for j, f in sorted(found.items()) if 0 <= j < len(header)}


def _pick_sheet(path: str, names: list[str], sheet: str | int | None) -> str:
    if sheet is None:
        if not names:
            raise InputError(path, "the workbook has no sheets")
        return names[0]
    if isinstance(sheet, int):
        if not 1 <= sheet <= len(names):
            raise InputError(path, f"no sheet number {sheet} (input.sheet); the workbook has {len(names)}: {names}")
        return names[sheet - 1]
    if sheet not in names:
        raise InputError(path, f"no sheet named {sheet!r} (input.sheet); the workbook has {names}")
    return sheet


def read_xlsx(
    path: Path | str,
    required: list[str],
    forbidden: AbstractSet[str] = frozenset(),
    sheet: str | int | None = None,
    batch_rows: int = 5_000,
) -> tuple[Any, Iterator[list[Any]]]:
    """Open one sheet of an .xlsx workbook: validate its header now, yield `Row` batches with Excel row numbers.

    Blank rows are skipped (as for CSV). Column types come from the cells; a column mixing
    types becomes text. Raises InputError naming file, sheet and row.
    """
    spath = str(path)
    if not Path(spath).exists():  # fastexcel says so as an "I/O error" of its own, not FileNotFoundError
        raise InputError(spath, "file not found")
    try:
        reader = fastexcel.read_excel(spath)
    except FileNotFoundError:
        raise InputError(spath, "file not found") from None
    except (fastexcel.FastExcelError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InputError(spath, f"not a readable .xlsx workbook ({first})") from None
    name = _pick_sheet(spath, list(reader.sheet_names), sheet)
    where = SheetPath(f"{spath} [{name}]")
    top = _header_row_number(spath, name)
    try:
        head = reader.load_sheet(name, header_row=None, n_rows=1, dtypes="string").to_polars()
        df = pl.read_excel(
            spath,
            sheet_name=name,
            engine="calamine",
            drop_empty_rows=False,
            drop_empty_cols=False,
            infer_schema_length=None,
            raise_if_empty=False,
        )
    except (fastexcel.FastExcelError, pl.exceptions.PolarsError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if (m := _TOO_BIG.search(first)) and (cell := _too_big_cell(spath, name, top, m.group(1))):
            ref, row, value = cell
            raise InputError(
                where,
                f"cell {ref} (column {m.group(1)!r}) holds {value}, too large for a column of whole numbers "
                "(at most 2^63-1); store the column as text (in Excel: Format Cells > Text, then enter it "
                "again) or correct the value",
                line=row,
            ) from None
        raise InputError(where, f"cannot read the sheet ({first})") from None
    if head.height == 0:
        raise InputError(where, "the sheet is empty (no header row)", line=1)
    header = ["" if v is None else str(v) for v in head.row(0)]
    try:
        check_columns(where, header, required, set(forbidden))
    except InputError:
        if (below := _header_below(reader, name, required)) is not None:
            raise InputError(
                where,
                f"this is not the header row: the columns {', '.join(required)} are on row {top + below}; "
                "delete the rows above that one (a title or notes) so the column names come first",
                line=top,
            ) from None
        raise
    if len(header) != df.width:  # cannot happen with calamine; a mismatch would shift every column
        raise InputError(where, f"header has {len(header)} columns but the data has {df.width}", line=top)
    df.columns = header
    df = df.with_columns(
        pl.col(c).cast(pl.String) for c, t in df.schema.items() if t.base_type().__name__ not in _KEPT_TYPES
    )
    schema = df.head(0).to_arrow().schema
    # a duration cell ([h]:mm:ss) travels as the integer count of its unit, as Parquet durations do
    df = df.with_columns(pl.col(c).cast(pl.Int64) for c, t in df.schema.items() if isinstance(t, pl.Duration))

    def batches() -> Iterator[list[Any]]:
        batch: list[Any] = []
        n = 0
        for start in range(0, df.height, batch_rows):
            for i, values in enumerate(df.slice(start, batch_rows).iter_rows(), start):
                if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                    continue  # a blank row, skipped as for CSV
                batch.append(Row(top + 1 + i, list(values)))
                n += 1
            if batch:
                yield batch
                batch = []
        if n == 0:
            raise InputError(where, "the sheet has a header but no data rows", line=top + 1)

    formats = number_formats(spath, name, top, header)
    return TableInfo(where, header, schema.serialize().to_pybytes(), formats=formats), batches()
