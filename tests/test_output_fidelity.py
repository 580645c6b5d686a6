"""Output fidelity: input columns come back exactly in every output format, or the job is refused
before paying; researched values are encoded once and the same way in every file; .xlsx cells keep
their look (number formats) and are never formulas. Everything runs against the emulator over loopback
and opens the outputs as a spreadsheet would (openpyxl)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from enrich.cli import main
from enrich.errors import InputError
from enrich.preflight import SheetFit
from enrich.read import Row, TableInfo
from enrich.xlsx import EXCEL_MAX_CELL_CHARS, EXCEL_MAX_ROWS
from tests.conftest import CANARY_KEY

openpyxl = pytest.importorskip("openpyxl")


@pytest.fixture(scope="module")
def api() -> Any:
    """One emulator for the module: its ledger shows whether a refused job sent anything."""
    from enrich.emulator import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig(time_scale=0)) as server:
        yield server


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("PARALLEL_", "ENRICH_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PARALLEL_API_KEY", CANARY_KEY)


def ledger(server: Any) -> list[dict[str, Any]]:
    return httpx.get(server.base_url + "/_emulator/ledger", timeout=10).json()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run `enrich ARGS` in-process; (exit code, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def refused(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("enrich: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def job(
    tmp: Path, src: Path, out: str, *, columns: tuple[str, ...] = ("company",), fields: str = "", extra: str = ""
) -> Path:
    fields = fields or '[task.output.hq]\ntype = "string"\n'
    text = (
        f'[input]\npath = {json.dumps(str(src))}\nkey = ["company"]\ncolumns = {json.dumps(list(columns))}\n\n'
        f'[task]\nprocessor = "lite-fast"\ninstruction = "Research the company."\n{extra}\n{fields}\n'
        f"[output]\npath = {json.dumps(str(tmp / out))}\n\n[limits]\nreconcile_grace_s = 3\nrequest_timeout_s = 2\n\n"
        "[emulator]\ntime_scale = 0\n"
    )
    cfg = tmp / "job.toml"
    cfg.write_text(text)
    return cfg


# ---- what an .xlsx output cannot hold is refused before paying -----------------------------------


def test_too_long_input_cell_is_refused_before_paying_for_xlsx_output(tmp_path: Path, capsys, keyed, api) -> None:
    """A 40,000-character input cell: .xlsx output is refused (file, line, column, what to do), nothing sent."""
    long = "lorem ipsum " * 3_334  # 40,008 characters: longer than an Excel cell
    src = tmp_path / "in.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["company", "notes"], ["Apple", "short"], ["Microsoft", long]])
    code, err = cli(capsys, "run", str(job(tmp_path, src, "out.xlsx")), "--base-url", api.base_url)
    refused(code, err, f"{src}:3: column notes:", f"{len(long):,} characters", "32,767", ".parquet or .csv")
    assert ledger(api) == []
    assert not (tmp_path / "out.xlsx").exists()


def test_too_long_input_cell_comes_back_exactly_in_csv_and_parquet(tmp_path: Path, capsys, keyed) -> None:
    """The same input with .csv or .parquet output runs, the long cell intact; exporting it to .xlsx is refused."""
    long = "é" * (EXCEL_MAX_CELL_CHARS + 1)
    src = tmp_path / "in.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["company", "notes"], ["Apple", "short"], ["Microsoft", long]])
    for out in ("out.csv", "out.parquet"):
        code, err = cli(capsys, "run", str(job(tmp_path, src, out)), "--emulator")
        assert code == 0, err
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        assert [r["notes"] for r in csv.DictReader(f)] == ["short", long]
    assert pq.read_table(tmp_path / "out.parquet").column("notes").to_pylist() == ["short", long]
    # the write-time backstop: nothing is paid at export, but the cell would still be cut
    code, err = cli(
        capsys, "export", str(tmp_path / "out.csv.journal.sqlite"), "--output", str(tmp_path / "again.xlsx")
    )
    refused(code, err, "input column 'notes'", "row 3", "32,767", "--output out.parquet")
    assert not (tmp_path / "again.xlsx").exists()


def test_parquet_input_with_more_rows_than_a_sheet_is_refused_at_once(tmp_path: Path, capsys, keyed, api) -> None:
    """1,048,576 data rows + the header do not fit one sheet: refused from the Parquet metadata, nothing sent."""
    src = tmp_path / "big.parquet"
    pq.write_table(pa.table({"company": pa.array([f"c{i}" for i in range(EXCEL_MAX_ROWS)])}), src)
    code, err = cli(capsys, "run", str(job(tmp_path, src, "out.xlsx")), "--base-url", api.base_url)
    refused(code, err, str(src), "1,048,576 data rows", "1,048,576 rows with the header", ".parquet or .csv")
    assert ledger(api) == []


def test_sheet_fit_counts_streamed_rows_up_to_the_last_that_fits(tmp_path: Path) -> None:
    """Streamed rows (CSV) are counted: row 1,048,575 fits under the header, the next one is refused."""
    fit = SheetFit(tmp_path / "o.xlsx", TableInfo("in.csv", ["company"], None))
    row = Row(0, ["x"])
    for line in range(2, EXCEL_MAX_ROWS + 1):  # data rows 1 .. 1,048,575 on lines 2 ..
        row.line = line
        fit.row(row, '["x"]')
    row.line = EXCEL_MAX_ROWS + 1
    with pytest.raises(InputError) as exc:
        fit.row(row, '["x"]')
    assert str(exc.value).startswith(f"in.csv:{EXCEL_MAX_ROWS + 1}: ") and "o.xlsx" in str(exc.value)


def test_sheet_fit_measures_nested_cells_as_the_text_excel_would_get() -> None:
    """A list cell is written as its JSON text: a list whose text is too long is refused, naming the column."""
    fit = SheetFit(Path("o.xlsx"), TableInfo("in.parquet", ["company", "tags"], None))
    tags = ["t" * 1_000] * 40
    with pytest.raises(InputError, match=r"in\.parquet:7: column tags: cell has 40,"):
        fit.row(Row(7, ["Apple", tags]), json.dumps(["Apple", tags]))
    fit.row(Row(8, ["Apple", tags[:30]]), json.dumps(["Apple", tags[:30]]))  # 30,120 characters: fits


# ---- an array of objects is encoded once, the same way in every file ----------------------------

OFFICERS = {
    "Apple": [{"name": 'Zoë "Z" O\'Neil', "role": "CEO"}, {"name": "Ann\nLee", "role": "=CFO"}],
    "Microsoft": [{"name": "Bob", "role": "CTO"}, None],  # an item that is not an object stays null
}
OFFICERS_SCHEMA = {
    "type": "object",
    "properties": {
        "officers": {
            "type": "array",
            "description": "Executive officers",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
                "required": ["name", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["officers"],
    "additionalProperties": False,
}


def test_array_of_objects_is_encoded_once_in_csv_parquet_xlsx_and_review(tmp_path: Path, capsys, keyed) -> None:
    """An array-of-objects field: one JSON array in CSV, xlsx and review cells; one JSON object per Parquet item."""
    knowledge = tmp_path / "knowledge.csv"
    with knowledge.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company", "officers"])  # easy cells: answered high, and right
        w.writerows([c, json.dumps(v, ensure_ascii=False)] for c, v in OFFICERS.items())
    (tmp_path / "schema.json").write_text(json.dumps(OFFICERS_SCHEMA))
    src = tmp_path / "in.csv"
    src.write_text("company\nApple\nMicrosoft\n")
    once = {c: json.dumps(v, ensure_ascii=False) for c, v in OFFICERS.items()}  # the one encoding
    for out in ("out.csv", "out.parquet", "out.xlsx"):
        cfg = job(tmp_path, src, out, fields=f'output_schema = "{tmp_path / "schema.json"}"\n')
        cfg.write_text(cfg.read_text().replace("time_scale = 0", f'time_scale = 0\nknowledge = "{knowledge}"'))
        # every answer goes to review, so the review file shows the value (a weak tier's may be wrong)
        cfg.write_text(cfg.read_text() + '\n[gate.fields.officers]\naccept = []\nreview = ["high", "medium"]\n')
        code, err = cli(capsys, "run", str(cfg), "--emulator")
        assert code == 0, err
        with (tmp_path / f"{Path(out).stem}.review.csv").open(newline="", encoding="utf-8") as f:
            review = {r["company"]: r["value"] for r in csv.DictReader(f) if r["field"] == "officers"}
        assert review == once, out
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        assert {r["company"]: r["officers"] for r in csv.DictReader(f)} == once
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("officers").type == pa.list_(pa.string())
    items = dict(zip(table.column("company").to_pylist(), table.column("officers").to_pylist(), strict=True))
    assert {c: [None if i is None else json.loads(i) for i in v] for c, v in items.items()} == OFFICERS
    assert items["Apple"][0] == json.dumps(OFFICERS["Apple"][0], ensure_ascii=False)  # one object, as text once
    ws = openpyxl.load_workbook(tmp_path / "out.xlsx")["Enriched"]
    header = [c.value for c in ws[1]]
    cells = {r[0].value: r[header.index("officers")] for r in ws.iter_rows(min_row=2)}
    assert {c: cell.value for c, cell in cells.items()} == once
    assert all(cell.data_type == "s" for cell in cells.values())


# ---- .xlsx cells look as the input did ------------------------------------------------------------

FORMATS = {  # column -> (number format as Excel writes it, a value)
    "opens": ("hh:mm", dt.time(9, 30)),
    "share": ("0%", 0.25),
    "price": ('"$"#,##0.00', 1234.5),
    "euros": ("#,##0.00 [$€-407]", 3.5),
    "day": ("d mmm yyyy", dt.datetime(2020, 1, 2)),
    "took": ("[h]:mm:ss", dt.timedelta(hours=36)),
    "count": ("General", 7),
}


def test_xlsx_input_number_formats_are_carried_to_xlsx_output(tmp_path: Path, capsys, keyed) -> None:
    """Percent, currency, time-of-day, date and duration cells of an .xlsx input keep value and format in .xlsx output."""
    src = tmp_path / "in.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["company", *FORMATS])
    for company in ("Apple", "Microsoft"):
        ws.append([company, *(v for _f, v in FORMATS.values())])
    for row in ws.iter_rows(min_row=2):
        for cell, (fmt, _v) in zip(row[1:], FORMATS.values(), strict=True):
            cell.number_format = fmt
    wb.save(src)
    code, err = cli(capsys, "run", str(job(tmp_path, src, "out.xlsx")), "--emulator")
    assert code == 0, err
    out = openpyxl.load_workbook(tmp_path / "out.xlsx")["Enriched"]
    header = [c.value for c in out[1]]
    rows = list(out.iter_rows(min_row=2))
    assert [r[0].value for r in rows] == ["Apple", "Microsoft"]
    for name, (fmt, value) in FORMATS.items():
        cells = [r[header.index(name)] for r in rows]
        assert [(c.value, c.number_format) for c in cells] == [(value, fmt)] * 2, name


def test_parquet_types_in_xlsx_output_are_typed_or_the_csv_text(tmp_path: Path, capsys, keyed) -> None:
    """Times get hh:mm:ss, durations [h]:mm:ss, aware datetimes their zone; lists, structs, maps and bytes the CSV text."""
    table = pa.table(
        {
            "company": ["Apple", "Microsoft"],
            "opens": pa.array([dt.time(9, 30), dt.time(17, 0, 5)], pa.time64("us")),
            "took": pa.array([90, 5_400], pa.duration("s")),
            "seen": pa.array([dt.datetime(2020, 1, 1, 12, tzinfo=dt.UTC)] * 2, pa.timestamp("us", "UTC")),
            "tags": pa.array([["a", 'b "c"'], None], pa.list_(pa.string())),
            "info": pa.array([{"x": 1, "t": dt.date(2020, 1, 2)}, None]),
            "pairs": pa.array([[("a", 1)], []], pa.map_(pa.string(), pa.int64())),
            "blob": pa.array([b"\x00\xff", None], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    for out in ("out.csv", "out.xlsx"):
        code, err = cli(capsys, "run", str(job(tmp_path, tmp_path / "in.parquet", out)), "--emulator")
        assert code == 0, err
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        as_csv = list(csv.DictReader(f))
    ws = openpyxl.load_workbook(tmp_path / "out.xlsx")["Enriched"]
    header = [c.value for c in ws[1]]
    rows = [{h: c for h, c in zip(header, r, strict=True)} for r in ws.iter_rows(min_row=2)]
    assert [(r["opens"].value, r["opens"].number_format) for r in rows] == [
        (dt.time(9, 30), "hh:mm:ss"),
        (dt.time(17, 0, 5), "hh:mm:ss"),
    ]
    assert [(r["took"].value, r["took"].number_format) for r in rows] == [
        (dt.timedelta(seconds=90), "[h]:mm:ss"),
        (dt.timedelta(seconds=5_400), "[h]:mm:ss"),
    ]
    assert {(r["seen"].value, r["seen"].number_format) for r in rows} == {
        (dt.datetime(2020, 1, 1, 12), 'yyyy-mm-dd hh:mm:ss "UTC"')
    }
    for name in ("tags", "info", "pairs", "blob"):
        assert [r[name].value or "" for r in rows] == [c[name] for c in as_csv], name
        assert all(r[name].data_type in ("s", "n") for r in rows)  # text, or an empty cell
    assert rows[0]["tags"].value == '["a", "b \\"c\\""]'


# ---- .xlsx cells are text, never formulas -------------------------------------------------------

HOSTILE = {
    "Apple": '=HYPERLINK("http://evil.example","click")',
    "Microsoft": "@SUM(A1:A9)",
    "Nvidia": "+1-2",
    "Tesla": "'quoted already",
}


def test_researched_formula_text_is_a_text_cell_in_xlsx_and_guarded_in_csv(tmp_path: Path, capsys, keyed) -> None:
    """Researched (and input) text starting with = @ + ' is a text cell holding exactly that text; no cell is a formula."""
    knowledge = tmp_path / "knowledge.csv"
    with knowledge.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["company", "hq"], *HOSTILE.items()])
    src = tmp_path / "in.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["company", "note"], *((c, "=1+1") for c in HOSTILE)])
    for out in ("out.xlsx", "out.csv"):
        cfg = job(tmp_path, src, out)
        cfg.write_text(cfg.read_text().replace("time_scale = 0", f'time_scale = 0\nknowledge = "{knowledge}"'))
        code, err = cli(capsys, "run", str(cfg), "--emulator")
        assert code == 0, err
    wb = openpyxl.load_workbook(tmp_path / "out.xlsx")
    ws = wb["Enriched"]
    header = [c.value for c in ws[1]]
    rows = {r[0].value: r for r in ws.iter_rows(min_row=2)}
    for company, text in HOSTILE.items():
        hq, note = rows[company][header.index("hq")], rows[company][header.index("note")]
        assert (hq.value, hq.data_type) == (text, "s")
        assert (note.value, note.data_type) == ("=1+1", "s")
    assert all(c.data_type != "f" for sheet in wb for row in sheet.iter_rows() for c in row)
    with zipfile.ZipFile(tmp_path / "out.xlsx") as z:  # no formula element in any sheet's XML
        assert not [n for n in z.namelist() if n.startswith("xl/worksheets/") and b"<f>" in z.read(n)]
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:  # CSV files are what the guard is for
        guarded = {r["company"]: (r["hq"], r["note"]) for r in csv.DictReader(f)}
    assert guarded["Apple"] == ("'" + HOSTILE["Apple"], "'=1+1")
    assert guarded["Microsoft"][0] == "'@SUM(A1:A9)" and guarded["Nvidia"][0] == "'+1-2"


def test_readme_says_the_formula_guard_is_for_csv_only() -> None:
    """README: formula_guard is CSV only and .xlsx text cells are never formulas, with no `'` in front."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    setting = next(line for line in readme.splitlines() if line.startswith("formula_guard ="))
    assert "CSV only" in setting and ".xlsx cells are text, never formulas" in setting
    assert "never a formula" in readme and "with no `'` in front" in readme
