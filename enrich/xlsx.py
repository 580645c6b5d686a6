"""Excel output: write the output as a formatted .xlsx (the .xlsx reader is in read.py).

Writing uses xlsxwriter (polars' `write_excel` backend; see write_workbook for why not
`write_excel` itself): typed cells, frozen header, auto-filter, column widths, colour-coded confidence and decision cells,
citations as links (http/https only; never `javascript:`), and a "Run summary" sheet.
Researched text is never a formula: the workbook is created with `strings_to_formulas`
off and every text is written as a text cell, so no `'` prefix is needed (the CSV formula
guard does not apply to .xlsx; researched text is shown exactly as researched).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from typing import Any
from urllib.parse import urlsplit

import polars as pl
import pyarrow as pa
import xlsxwriter

from enrich.files import encode_cell
from enrich.read import to_json_values

EXCEL_MAX_ROWS = 1_048_576  # including the header row
EXCEL_MAX_CELL_CHARS = 32_767
EXCEL_MAX_URL_CHARS = 2_079
EXCEL_MAX_URLS = 65_530  # per worksheet; xlsxwriter drops (and warns about) any more
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


def _json_items(items: Any) -> str:
    """A list of JSON texts as the one JSON array they make, as files.encode_cell writes it.

    >>> _json_items(['{"a": 1}', None])
    '[{"a": 1}, null]'
    """
    return "[" + ", ".join("null" if i is None else i for i in items) + "]"


def _as_text(t: Any) -> bool:
    """Is an Arrow type one no Excel cell holds (lists, structs, maps, bytes)? Such input cells become text."""
    return bool(pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)) or bool(
        pa.types.is_fixed_size_binary(t)
    )


def to_frame(table: Any, kinds: dict[str, str]) -> Any:
    """Arrow output table -> polars frame Excel can hold: lists become text, researched text clipped (marked).

    `kinds` maps output column -> 'citations' | 'array' | 'json_items' | 'text' (researched). Other columns
    (the input's, the status columns) keep their types, except those no cell holds (lists, structs, maps,
    bytes): they become the text a CSV output has for them (JSON, base64), never cut.
    """
    for i, name in enumerate(table.column_names):
        if name not in kinds and _as_text(table.schema.field(i).type):
            values = to_json_values(table.column(i).combine_chunks())
            text = pa.array([None if v is None else encode_cell(v) for v in values], pa.string())
            table = table.set_column(i, name, text)
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)  # a table, not one array: always a frame
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
        elif kind == "json_items":  # items are already one JSON text each (null: not an object): encoded once
            exprs.append(col.map_elements(_json_items, return_dtype=pl.String).alias(name))
    if exprs:
        df = df.with_columns(exprs)
    texts = [n for n, k in kinds.items() if n in df.columns and df.schema[n] == pl.String]
    if texts:
        df = df.with_columns(pl.col(n).map_elements(_clip, return_dtype=pl.String) for n in texts)
    return df


def longest_cell(df: Any, columns: list[str]) -> tuple[str, int, int] | None:
    """(column, sheet row, characters) of the first text cell among `columns` too long for Excel, or None."""
    for name in columns:
        if name not in df.columns or df.schema[name] != pl.String:
            continue
        lens = df.get_column(name).str.len_chars()
        if (lens.max() or 0) > EXCEL_MAX_CELL_CHARS:
            i = int((lens > EXCEL_MAX_CELL_CHARS).arg_true()[0])
            return name, i + 2, int(lens[i])  # sheet row: 1-based, below the header
    return None


def _width(df: Any, name: str) -> int:
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


def default_format(dtype: Any) -> str | None:
    """The number format of a date/time column with no format of its own (Excel cells hold no time zone:
    an aware column is written as its wall-clock time with the zone named in the format)."""
    if dtype == pl.Date:
        return "yyyy-mm-dd"
    if isinstance(dtype, pl.Datetime):
        return "yyyy-mm-dd hh:mm:ss" + (f' "{dtype.time_zone}"' if dtype.time_zone else "")
    if dtype == pl.Time:
        return "hh:mm:ss"
    if isinstance(dtype, pl.Duration):
        return "[h]:mm:ss"
    return None


def write_workbook(
    fp: Any,
    df: Any,
    coloured: list[str],
    citations: list[str],
    summary: list[tuple[str, Any]],
    formats: dict[str, str | int] | None = None,
) -> int:
    """Write the data sheet and the "Run summary" sheet to the binary file `fp`; return the links written.

    `formats` gives columns their number format (an .xlsx input's, read.number_formats: a format
    code or a built-in format id); other date and time columns get `default_format`.

    Cells are written with xlsxwriter directly rather than through polars' `write_excel`:
    that always makes an Excel *table*, whose headers must be unique ignoring case, and an
    input column `Founded` beside the output column `founded` is legal here (xlsxwriter would
    drop the whole table with only a warning). A plain range with an auto-filter has no such rule.
    """
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
    number_formats: dict[str | int, Any] = {}
    fills = {c: wb.add_format({"bg_color": c}) for c in (GREEN, AMBER, RED)}
    link = wb.add_format({"font_color": "#0563C1", "underline": 1})
    coloured_set, citation_set = set(coloured), set(citations)
    links = 0
    for j, name in enumerate(df.columns):
        ws.write_string(0, j, name, head)
        series = df.get_column(name)
        code = (formats or {}).get(name) or default_format(series.dtype)
        if code is not None and code not in number_formats:
            number_formats[code] = wb.add_format({"num_format": code})
        fmt = number_formats.get(code) if code is not None else None
        aware = isinstance(series.dtype, pl.Datetime) and series.dtype.time_zone is not None
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
            elif isinstance(v, dt.date | dt.time | dt.timedelta):  # datetime is a date
                if aware and isinstance(v, dt.datetime):
                    v = v.replace(tzinfo=None)  # its wall-clock time in the column's zone (named in `fmt`)
                ws.write_datetime(i, j, v, fmt)
            else:
                ws.write(i, j, v, fmt)
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
