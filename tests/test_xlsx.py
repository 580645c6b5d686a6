"""Excel in and out, end to end over loopback: typed cells, colours, links, errors naming sheet and row."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import polars as pl
import pytest

from enrich.errors import InputError
from enrich.read import read_xlsx
from enrich.xlsx import GREEN, RED, colour_for, link_target, write_workbook
from tests.conftest import run_enrich, write_config

openpyxl = pytest.importorskip("openpyxl")


def sp500_xlsx(sp500: Path, dest: Path, n: int = 500, sheet: str = "Constituents") -> pl.DataFrame:
    """The first `n` S&P rows as a workbook with real date and integer cells."""
    df = (
        pl.read_csv(sp500, infer_schema=False)
        .head(n)
        .with_columns(pl.col("Date added").str.to_date("%Y-%m-%d", strict=False), pl.col("CIK").cast(pl.Int64))
    )
    df.write_excel(dest, worksheet=sheet)
    return df


def _config(tmp: Path, inp: Path, out: Path, key: str = "Symbol", sheet: str | None = None) -> Path:
    extra_input = f'sheet = "{sheet}"\n' if sheet else ""
    cfg = write_config(
        tmp / "job.toml",
        input_path=inp,
        output=out,
        key=[key],
        columns=["Security"],
        fields={"headquarters_location": "string", "founded": "integer"},
    )
    text = cfg.read_text().replace("[input]\n", "[input]\n" + extra_input, 1)
    cfg.write_text(text)
    return cfg


def test_sp500_xlsx_in_xlsx_out(tmp_path: Path, sp500: Path, emulator_process) -> None:
    """500 S&P rows in a workbook come back in order, typed, with coloured confidence and linked citations."""
    emu = emulator_process("--knowledge", str(sp500), "--knowledge-key", "Security", "--time-scale", "0")
    src = sp500_xlsx(sp500, tmp_path / "sp.xlsx")
    out = tmp_path / "out.xlsx"
    r = run_enrich(
        "run", str(_config(tmp_path, tmp_path / "sp.xlsx", out, sheet="Constituents")), "--base-url", emu.base_url
    )
    assert r.returncode == 0, r.stderr
    assert len(emu.ledger()) == 500
    wb = openpyxl.load_workbook(out)
    assert wb.sheetnames == ["Enriched", "Run summary"]
    ws = wb["Enriched"]
    header = [c.value for c in ws[1]]
    col = {name: i for i, name in enumerate(header)}
    rows = list(ws.iter_rows(min_row=2, values_only=False))
    assert len(rows) == 500
    assert [r_[col["Symbol"]].value for r_ in rows] == src["Symbol"].to_list()
    # input types kept: a date cell stays a date, an integer stays a number
    first = rows[0]
    assert isinstance(first[col["Date added"]].value, dt.datetime)
    assert first[col["Date added"]].value.date() == src["Date added"][0]
    assert first[col["CIK"]].value == src["CIK"][0] and first[col["CIK"]].data_type == "n"
    # output columns typed: the integer field is numeric, the latency is a number
    years = [r_[col["founded"]] for r_ in rows if r_[col["founded"]].value is not None]
    assert years and all(c.data_type == "n" for c in years)
    assert all(isinstance(r_[col["_enrich_latency_s"]].value, int | float) for r_ in rows)
    # confidence cells coloured, citations linked to their first URL
    conf = [r_[col["headquarters_location__confidence"]] for r_ in rows]
    assert {c.value for c in conf} == {"high"}
    assert all(c.fill.fgColor.rgb == "FF" + GREEN[1:] for c in conf)
    cites = [r_[col["headquarters_location__citations"]] for r_ in rows]
    assert all(c.hyperlink is not None and c.hyperlink.target.startswith("https://") for c in cites)
    assert all(c.hyperlink.target == c.value.split("\n")[0] for c in cites)
    # frozen header and an auto-filter over the whole table
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == f"A1:{openpyxl.utils.get_column_letter(len(header))}501"
    summary = {r_[0]: r_[1] for r_ in wb["Run summary"].iter_rows(values_only=True) if r_[0]}
    assert summary["Rows"] == 500 and summary["  completed"] == 500


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("duplicate", "[Constituents] row 8: duplicate key"),
        ("missing_sheet", "no sheet named 'Nope'"),
        ("corrupt", "not a readable .xlsx workbook"),
        ("absent", "file not found"),  # not a calamine I/O error: said as for .csv and .parquet
        ("missing_column", "[Constituents] row 1: missing column(s) ['Security']"),
        ("empty_key", "[Constituents] row 4: empty key"),
    ],
)
def test_bad_workbook_exits_2_naming_sheet_and_row(
    tmp_path: Path, sp500: Path, emulator_process, case: str, expect: str
) -> None:
    """A bad workbook stops with one line naming file, sheet and row, and nothing reaches the API."""
    emu = emulator_process("--time-scale", "0")
    book = tmp_path / "bad.xlsx"
    df = pl.read_csv(sp500, infer_schema=False).head(10).select("Symbol", "Security")
    sheet = "Constituents"
    if case == "duplicate":
        df = df.with_columns(
            pl.when(pl.int_range(pl.len()) == 6)
            .then(pl.lit(df["Symbol"][2]))
            .otherwise(pl.col("Symbol"))
            .alias("Symbol")
        )
    elif case == "missing_column":
        df = df.rename({"Security": "Name"})
    elif case == "empty_key":
        df = df.with_columns(
            pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("   ")).otherwise(pl.col("Symbol")).alias("Symbol")
        )
    if case == "corrupt":
        book.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 64)
    elif case != "absent":
        df.write_excel(book, worksheet=sheet)
    cfg = _config(tmp_path, book, tmp_path / "out.xlsx", sheet="Nope" if case == "missing_sheet" else None)
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr, r.stderr
    assert str(book) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert emu.ledger() == []
    assert not (tmp_path / "out.xlsx").exists()


@pytest.mark.parametrize("ext", [".json", ".xls", ".txt", ".ods", ""])
def test_unsupported_output_extension_exits_2_before_sending(tmp_path: Path, emulator_process, ext: str) -> None:
    """An output path with an extension enrich cannot write is refused before any request."""
    emu = emulator_process("--time-scale", "0")
    inp = tmp_path / "in.csv"
    inp.write_text("company\nApple\nMicrosoft\n")
    cfg = write_config(
        tmp_path / "job.toml", input_path=inp, output=tmp_path / f"out{ext}", key=["company"], columns=["company"]
    )
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode == 2, r.stderr
    assert "unsupported output extension" in r.stderr and "Traceback" not in r.stderr
    assert emu.ledger() == []


def test_reader_reports_excel_row_numbers_and_skips_blank_rows(tmp_path: Path) -> None:
    """Rows carry the numbers Excel shows, even when the table starts lower down and has blank rows."""
    import xlsxwriter

    path = tmp_path / "offset.xlsx"
    wb = xlsxwriter.Workbook(path)
    ws = wb.add_worksheet("Data")
    ws.write_row(2, 1, ["company", "n"])  # header on Excel row 3, from column B
    ws.write_row(3, 1, ["A", 1])
    ws.write_row(5, 1, ["B", 2.5])  # row 5 left blank
    wb.close()
    info, batches = read_xlsx(path, ["company"])
    rows = [r for b in batches for r in b]
    assert info.columns == ["company", "n"]
    assert [(r.line, r.values) for r in rows] == [(4, ["A", 1.0]), (6, ["B", 2.5])]
    assert str(info.path) == f"{path} [Data]"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (["company", "company"], "duplicate column name 'company'"),
        (["company", None], "header column 2 has an empty name"),
        (["company", "_enrich_status"], "collides with an output column"),
    ],
)
def test_bad_header_names_sheet_and_row_1(tmp_path: Path, header: list, reason: str) -> None:
    """Header problems name the sheet and row 1, as for CSV."""
    import xlsxwriter

    path = tmp_path / "h.xlsx"
    wb = xlsxwriter.Workbook(path)
    ws = wb.add_worksheet("S")
    for j, h in enumerate(header):
        if h is not None:
            ws.write(0, j, h)
    ws.write_row(1, 0, ["A", "x"])
    wb.close()
    with pytest.raises(InputError) as exc:
        _info, batches = read_xlsx(path, ["company"])
        list(batches)
    assert str(exc.value).startswith(f"{path} [S] row 1: ") and reason in str(exc.value)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://example.com/a", True),
        ("http://x.org", True),
        ("javascript:alert(1)", False),
        ("JAVASCRIPT:alert(1)", False),
        ("  javascript:alert(1)", False),
        ("data:text/html,<b>", False),
        ("file:///etc/passwd", False),
        ('=HYPERLINK("http://evil")', False),
        ("http://", False),
        ("https://a.com/\nx", False),
        ("ftp://a.com", False),
    ],
)
def test_only_http_urls_become_links(url: str, ok: bool) -> None:
    """Only http(s) URLs with a host may become links."""
    assert (link_target(url) is not None) is ok


@pytest.mark.parametrize(
    ("value", "fill"),
    [("high", GREEN), ("Low", RED), ("accepted", GREEN), ("rejected", RED), ("", None), (None, None), ("weird", None)],
)
def test_colour_for(value: str | None, fill: str | None) -> None:
    """Confidence and decision values map to green/amber/red fills."""
    assert colour_for(value) == fill


def test_hostile_text_is_never_a_formula_or_a_script_link(tmp_path: Path) -> None:
    """Researched text starting with = is a text cell, shown as researched (no CSV guard); javascript: is never a link."""
    from enrich.xlsx import to_frame

    table = pl.DataFrame(
        {
            "company": ["A", "B"],
            "hq": ['=HYPERLINK("http://evil","x")', "@SUM(1)"],
            "hq__confidence": ["high", "<b>low</b>"],
            "hq__citations": [["javascript:alert(1)", "https://ok.example"], ["=cmd|' /C calc'!A0"]],
        }
    ).to_arrow()
    df = to_frame(table, {"hq": "text", "hq__confidence": "text", "hq__citations": "citations"})
    buf = io.BytesIO()
    links = write_workbook(buf, df, ["hq__confidence"], ["hq__citations"], [("Rows", 2)])
    assert links == 0
    ws = openpyxl.load_workbook(io.BytesIO(buf.getvalue()))["Enriched"]
    cells = [c for row in ws.iter_rows() for c in row]
    assert all(c.data_type != "f" for c in cells)
    assert all(c.hyperlink is None for c in cells)
    assert ws["B2"].value == '=HYPERLINK("http://evil","x")'
    assert ws["B2"].data_type == "s"
    assert ws["D2"].value == "javascript:alert(1)\nhttps://ok.example"
