"""audit.py: the long-format evidence file, one line per (row, field, citation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from enrich import audit
from enrich.audit import basis_rows, write_basis
from enrich.config import GateConfig
from enrich.errors import ConfigError
from enrich.files import basis_path
from enrich.gate import Verdict, apply_verdicts, merge


def result(run_id: str, processor: str, content: dict[str, Any], basis: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "run": {"run_id": run_id, "processor": processor},
        "output": {"type": "json", "content": content, "basis": basis},
    }


RAW = result(
    "trun_1",
    "base",
    {"city": "=Austin", "year": 1998, "founders": ["Ann", "Bob"], "ceo": None},
    [
        {
            "field": "city",
            "reasoning": "about page",
            "confidence": "high",
            "citations": [
                {"url": "https://a.com", "title": "About", "excerpts": ["HQ Austin", "more"]},
                {"url": "https://b.com", "title": None, "excerpts": None},
            ],
        },
        {"field": "year", "reasoning": "history", "confidence": "", "citations": []},
        {
            "field": "founders.0",
            "reasoning": "r0",
            "confidence": "high",
            "citations": [{"url": "https://c.com", "excerpts": ["Ann founded"]}],
        },
        {"field": "founders.1", "reasoning": "r1", "confidence": "low", "citations": []},
    ],
)
FIELDS = ["city", "year", "founders", "ceo"]


def test_basis_path() -> None:
    """The basis file follows the output's format."""
    assert basis_path(Path("o/x.enriched.parquet")) == Path("o/x.enriched.basis.parquet")
    assert basis_path(Path("o/x.csv")) == Path("o/x.basis.csv")


def test_lines_from_a_raw_result() -> None:
    """Each citation is a line; fields without citations or basis still get one line; elements get their own."""
    decisions = {"city": "accepted", "year": "rejected", "founders": "rejected", "ceo": "rejected"}
    lines = list(basis_rows({"company": "acme"}, RAW, decisions, gate_cfg=GateConfig()))
    got = [(x["field"], x["value"], x["confidence"], x["decision"], x["citation"], x["url"]) for x in lines]
    assert got == [
        ("city", "=Austin", "high", "accepted", 0, "https://a.com"),
        ("city", "=Austin", "high", "accepted", 1, "https://b.com"),
        ("year", "1998", "none", "rejected", None, None),
        ("founders", '["Ann", "Bob"]', "low", "rejected", None, None),
        ("founders.0", "Ann", "high", "accepted", 0, "https://c.com"),
        ("founders.1", "Bob", "low", "rejected", None, None),
        ("ceo", "", "none", "rejected", None, None),
    ]
    assert all(x["company"] == "acme" and x["processor"] == "base" and x["run_id"] == "trun_1" for x in lines)
    assert lines[0]["excerpts"] == ["HQ Austin", "more"] and lines[1]["excerpts"] is None
    assert (
        lines[0]["reasoning"] == "about page" and lines[2]["reasoning"] == "history" and lines[3]["reasoning"] is None
    )
    # without a gate, element lines inherit the field's decision
    plain = list(basis_rows({"company": "acme"}, RAW, {"founders": "review"}))
    assert {x["decision"] for x in plain} == {"review"}


def test_lines_from_a_merged_row_with_a_correction() -> None:
    """A merged row reports each field's winning processor; a human correction has one line."""
    pro = result(
        "trun_2",
        "pro",
        {"city": "Dallas", "year": 1999},
        [{"field": "year", "reasoning": "filing", "confidence": "high", "citations": []}],
    )
    m = merge([("base", RAW), ("pro", pro)], ["city", "year"], GateConfig(), key=("acme",))
    m = apply_verdicts(m, [Verdict(("acme",), "city", "correct", corrected_value="Houston")])
    lines = list(basis_rows({"company": "acme"}, m))
    assert [(x["field"], x["value"], x["processor"], x["run_id"], x["decision"]) for x in lines] == [
        ("city", "Houston", "human", None, "human_corrected"),
        ("year", "1999", "pro", "trun_2", "accepted"),
    ]


def _lines(n: int) -> Any:
    for i in range(n):
        yield from basis_rows({"company": f"c{i}", "n": i}, RAW, {"city": "accepted", "founders": "review"})


def test_write_parquet_streams_in_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parquet keeps types (excerpts stay lists) and is written one bounded row group at a time."""
    monkeypatch.setattr(audit, "BASIS_CHUNK", 7)
    path = tmp_path / "b.basis.parquet"
    assert write_basis(path, _lines(10), ["company", "n"]) == 50
    f = pq.ParquetFile(path)
    assert f.metadata.num_rows == 50 and f.metadata.num_row_groups == 8
    table = f.read()
    assert table.column_names[:3] == ["company", "n", "field"]
    rows = table.to_pylist()
    assert rows[0]["excerpts"] == ["HQ Austin", "more"] and rows[0]["n"] == "0" and rows[0]["citation"] == 0


def test_write_csv_is_guarded(tmp_path: Path) -> None:
    """CSV cells are formula-guarded and lists are JSON arrays."""
    path = tmp_path / "b.basis.csv"
    assert write_basis(path, _lines(2), ["company", "n"]) == 10
    with path.open(encoding="utf-8", newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert rows[0]["value"] == "'=Austin" and json.loads(rows[0]["excerpts"]) == ["HQ Austin", "more"]
    assert rows[1]["excerpts"] == "" and rows[0]["citation"] == "0"


@pytest.mark.parametrize("name", ["b.basis.parquet", "b.basis.csv"])
def test_write_is_atomic(tmp_path: Path, name: str) -> None:
    """A failure mid-stream leaves the previous file untouched and no temp file behind."""
    path = tmp_path / name
    path.write_bytes(b"previous")

    def broken() -> Any:
        yield from _lines(3)
        raise RuntimeError("journal read failed")

    with pytest.raises(RuntimeError):
        write_basis(path, broken(), ["company", "n"])
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize(
    "name,keys,problem",
    [
        ("b.json", ["company"], "must end in .parquet"),
        ("b.csv", ["url"], "key column 'url'"),
    ],
)
def test_write_refuses(tmp_path: Path, name: str, keys: list[str], problem: str) -> None:
    """Unknown formats and clashing key columns are config errors."""
    with pytest.raises(ConfigError, match=problem):
        write_basis(tmp_path / name, [], keys)
