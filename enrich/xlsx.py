"""Excel workbooks: read one sheet of an .xlsx as input rows; write the output as a formatted .xlsx.

Reading uses polars' calamine engine (fastexcel): fast, no openpyxl, and cell types survive
(numbers stay numbers, dates stay dates; they reach the output with their types through the
same Arrow schema the Parquet reader records). Row numbers in errors are the ones Excel shows
(`companies.xlsx [Sheet1] row 57: ...`), found from the sheet XML because calamine trims
leading empty rows.

Writing uses xlsxwriter (polars' `write_excel` backend; see write_workbook for why not
`write_excel` itself): typed cells, frozen header, auto-filter, column widths, colour-coded confidence and decision cells,
citations as links (http/https only; never `javascript:`), and a "Run summary" sheet.
Researched text is never a formula: the workbook is created with `strings_to_formulas`
off, and with the formula guard on, text that a spreadsheet would run gets the same `'`
prefix as in CSV output (so copying the sheet to CSV stays safe too).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

from enrich.errors import InputError, SheetPath

EXCEL_MAX_ROWS = 1_048_576  # including the header row
EXCEL_MAX_CELL_CHARS = 32_767
EXCEL_MAX_URL_CHARS = 2_079
EXCEL_MAX_URLS = 65_530  # per worksheet; xlsxwriter drops (and warns about) any more
_KEPT_TYPES = ("Int64", "Float64", "Boolean", "Date", "Datetime", "String")
_NS = {
    "m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
    "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
    "p": "http://schemas.openxmlformats.org/package/2006/relationships",
}


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
                        if any(
                            c.find("m:v", _NS) is not None or c.find("m:is", _NS) is not None
                            for c in el.iterfind("m:c", _NS)
                        ):
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


def _sheet_member(z: zipfile.ZipFile, sheet: str) -> str | None:
    """The zip member holding the sheet named `sheet`."""
    wb = ElementTree.fromstring(z.read("xl/workbook.xml"))
    rid = next(
        (s.get(f"{{{_NS['r']}}}id") for s in wb.iterfind("m:sheets/m:sheet", _NS) if s.get("name") == sheet),
        None,
    )
    rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    target = next((r.get("Target") for r in rels.iterfind("p:Relationship", _NS) if r.get("Id") == rid), None)
    if not target:
        return None
    return target.lstrip("/") if target.startswith("/") else f"xl/{target}"


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
    forbidden: set[str] = frozenset(),
    sheet: str | int | None = None,
    batch_rows: int = 5_000,
) -> tuple[Any, Iterator[list[Any]]]:
    """Open one sheet of an .xlsx workbook: validate its header now, yield `Row` batches with Excel row numbers.

    Blank rows are skipped (as for CSV). Column types come from the cells; a column mixing
    types becomes text. Raises InputError naming file, sheet and row.
    """
    import fastexcel
    import polars as pl

    from enrich.read import Row, TableInfo, check_columns

    spath = str(path)
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

    return TableInfo(where, header, schema.serialize().to_pybytes()), batches()


# ---- output --------------------------------------------------------------------------------------

GREEN, AMBER, RED = "#C6EFCE", "#FFEB9C", "#FFC7CE"  # Excel's own "good / neutral / bad" fills
_COLOURS = {
    "high": GREEN,
    "accepted": GREEN,
    "accept": GREEN,
    "medium": AMBER,
    "review": AMBER,
    "low": RED,
    "rejected": RED,
    "reject": RED,
}
_SAFE_URL = re.compile(r"^[^\x00-\x20\x7f]+$")


def link_target(url: Any) -> str | None:
    """The URL when it may become a clickable link (http/https with a host), else None.

    >>> link_target("https://a.example/x"), link_target("javascript:alert(1)"), link_target("http:///x")
    ('https://a.example/x', None, None)
    """
    if not isinstance(url, str) or len(url) > EXCEL_MAX_URL_CHARS or not _SAFE_URL.match(url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return url


def colour_for(value: Any) -> str | None:
    """Fill colour of a confidence or decision cell: `colour_for('High')` -> '#C6EFCE'; unknown -> None."""
    return _COLOURS.get(str(value).strip().casefold()) if value is not None else None


def _clip(text: str) -> str:
    if len(text) <= EXCEL_MAX_CELL_CHARS:
        return text
    return text[: EXCEL_MAX_CELL_CHARS - 20] + " …[truncated]"


def to_frame(table: Any, kinds: dict[str, str], guard: Any) -> Any:
    """Arrow output table -> polars frame Excel can hold: lists become text, researched text guarded.

    `kinds` maps output column -> 'citations' | 'array' | 'text' (researched) ; other columns
    (the input's, the status columns) are left as they were.
    """
    import polars as pl

    df = pl.from_arrow(table)
    exprs = []
    for name, kind in kinds.items():
        if name not in df.columns:
            continue
        col = pl.col(name)
        if kind == "citations":
            exprs.append(col.list.join("\n").alias(name))
        elif kind == "array":
            exprs.append(
                col.map_elements(
                    lambda v: json.dumps(list(v), ensure_ascii=False, default=str), return_dtype=pl.String
                ).alias(name)
            )
    if exprs:
        df = df.with_columns(exprs)
    texts = [n for n, k in kinds.items() if n in df.columns and df.schema[n] == pl.String]
    if texts:
        df = df.with_columns(pl.col(n).map_elements(lambda v: _clip(guard(v)), return_dtype=pl.String) for n in texts)
    return df


def _width(df: Any, name: str) -> int:
    import polars as pl

    sample = df.get_column(name).head(2_000)
    if sample.dtype == pl.String:
        lens = sample.drop_nulls().str.len_chars()
        body = int(lens.quantile(0.9) or 0) if lens.len() else 0
    elif sample.dtype in (pl.Date,):
        body = 10
    elif sample.dtype == pl.Datetime:
        body = 19
    else:
        body = max((len(str(v)) for v in sample.drop_nulls().to_list()), default=0)
    return max(8, min(60, max(len(name), body) + 2))


def write_workbook(fp: Any, df: Any, coloured: list[str], citations: list[str], summary: list[tuple[str, Any]]) -> int:
    """Write the data sheet and the "Run summary" sheet to the binary file `fp`; return the links written.

    Cells are written with xlsxwriter directly rather than through polars' `write_excel`:
    that always makes an Excel *table*, whose headers must be unique ignoring case, and an
    input column `Founded` beside the output column `founded` is legal here (xlsxwriter would
    drop the whole table with only a warning). A plain range with an auto-filter has no such rule.
    """
    import polars as pl
    import xlsxwriter

    zipped = io.BytesIO()  # built in memory: a full disk then fails one plain write, not the zip writer (whose
    wb = xlsxwriter.Workbook(  # finaliser would later trip over the closed file and print a traceback)
        zipped,
        {
            "strings_to_formulas": False,
            "strings_to_urls": False,
            "strings_to_numbers": False,
            "nan_inf_to_errors": True,
            "in_memory": True,
        },
    )
    ws = wb.add_worksheet("Enriched")
    head = wb.add_format({"bold": True, "bg_color": "#DDEBF7", "bottom": 1})
    date = wb.add_format({"num_format": "yyyy-mm-dd"})
    stamp = wb.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
    fills = {c: wb.add_format({"bg_color": c}) for c in (GREEN, AMBER, RED)}
    link = wb.add_format({"font_color": "#0563C1", "underline": 1})
    coloured_set, citation_set = set(coloured), set(citations)
    links = 0
    for j, name in enumerate(df.columns):
        ws.write_string(0, j, name, head)
        series = df.get_column(name)
        fmt = date if series.dtype == pl.Date else stamp if series.dtype == pl.Datetime else None
        ws.set_column(j, j, _width(df, name), fmt)
        for i, v in enumerate(series.to_list(), 1):
            if v is None:
                continue
            if name in coloured_set and (c := colour_for(v)) is not None:
                ws.write_string(i, j, str(v), fills[c])
            elif name in citation_set and links < EXCEL_MAX_URLS and (url := link_target(v.split("\n", 1)[0])):
                ws.write_url(i, j, url, link, string=v, tip="first citation")
                links += 1
            elif isinstance(v, str):
                ws.write_string(i, j, v)
            elif fmt is not None:
                ws.write_datetime(i, j, v, fmt)
            else:
                ws.write(i, j, v)
    ws.freeze_panes(1, 0)
    ws.autofilter(0, 0, max(df.height, 1), max(df.width - 1, 0))
    _summary_sheet(wb, summary)
    wb.close()
    fp.write(zipped.getbuffer())
    return links


def _summary_sheet(wb: Any, summary: list[tuple[str, Any]]) -> None:
    ws = wb.add_worksheet("Run summary")
    bold = wb.add_format({"bold": True})
    ws.set_column(0, 0, 42)
    ws.set_column(1, 1, 28)
    ws.write_string(0, 0, "Run summary", bold)
    for i, (label, value) in enumerate(summary, 2):
        ws.write_string(i, 0, label, bold if value is None else None)
        if isinstance(value, bool):
            ws.write_boolean(i, 1, value)
        elif isinstance(value, int | float):
            ws.write_number(i, 1, value)
        elif value is not None:
            ws.write_string(i, 1, _clip(str(value)))
