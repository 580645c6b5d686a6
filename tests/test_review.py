"""review.py: the review file goes out with evidence and comes back as validated verdicts."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich.config import GateConfig
from enrich.errors import ConfigError, InputError
from enrich.files import guard, review_path, unguard
from enrich.gate import FieldAnswer, MergedRow, merge
from enrich.review import read_review, write_review

SCHEMA: dict[str, dict[str, Any]] = {
    "city": {"type": ["string", "null"]},
    "year": {"type": ["integer", "null"]},
    "revenue": {"type": ["number", "null"]},
    "public": {"type": ["boolean", "null"]},
    "founders": {"type": ["array", "null"], "items": {"type": "string"}},
    "hq": {
        "type": ["object", "null"],
        "properties": {"city": {"type": ["string", "null"]}, "country": {"type": ["string", "null"]}},
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    "size": {"type": ["string", "null"], "enum": ["small", "large", None]},
}


def answer(value: Any, decision: str = "review", run_id: str = "trun_1") -> FieldAnswer:
    basis = {
        "field": "x",
        "reasoning": "seen on the about page",
        "confidence": "medium",
        "citations": [
            {"url": "https://a.com/about", "title": "About", "excerpts": ["first", "second"]},
            {"url": "https://b.com", "title": None, "excerpts": None},
        ],
    }
    return FieldAnswer(
        value=value, confidence="medium", decision=decision, processor="core", run_id=run_id, basis=basis
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fp:  # newline="": keep a lone \r inside a cell
        return list(csv.DictReader(fp))


def fill(path: Path, edits: dict[int, dict[str, str]]) -> None:
    """Set cells of data lines (0-based) as a reviewer would, keeping everything else."""
    rows = read_rows(path)
    for i, cells in edits.items():
        rows[i].update(cells)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode("utf-8"))


def test_review_path() -> None:
    """The review file sits beside the output, named after its stem."""
    assert review_path(Path("out/c.enriched.parquet")) == Path("out/c.enriched.review.csv")


def test_write_exports_only_review_and_rejected(tmp_path: Path) -> None:
    """Accepted and human-decided fields stay out; evidence columns are filled; verdict columns empty."""
    row = MergedRow(
        key=("=acme", "US"),
        fields={
            "city": answer("Austin"),
            "year": answer(1998, "accepted"),
            "founders": answer(["A", "B"], "rejected"),
            "public": answer(True, "human_rejected"),
        },
    )
    path = tmp_path / "o.review.csv"
    assert write_review(path, [row], ["company", "country"]) == 2
    rows = read_rows(path)
    assert [r["field"] for r in rows] == ["city", "founders"]
    first = rows[0]
    assert first["company"] == "'=acme" and first["country"] == "US"
    assert (first["value"], first["confidence"], first["processor"], first["run_id"]) == (
        "Austin",
        "medium",
        "core",
        "trun_1",
    )
    assert first["reasoning"] == "seen on the about page"
    assert first["citations"] == (
        '[{"url": "https://a.com/about", "title": "About", "excerpt": "first"},\n'
        '{"url": "https://b.com", "title": null, "excerpt": null}]'
    )
    assert rows[1]["value"] == '["A", "B"]'
    assert all(first[c] == "" for c in ("verdict", "corrected_value", "reviewer", "note"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_element_entries_stand_in_for_a_missing_field_entry(tmp_path: Path) -> None:
    """An array with only element-level basis shows each element's reasoning and citations."""
    elems = tuple(
        {
            "field": f"founders.{i}",
            "reasoning": f"r{i}",
            "confidence": "low",
            "citations": [{"url": f"https://{i}.com", "excerpts": ["e"]}],
        }
        for i in range(2)
    )
    a = FieldAnswer(["A", "B"], "low", "rejected", "lite", "trun_2", None, elems)
    path = tmp_path / "r.csv"
    write_review(path, [MergedRow(key=("k",), fields={"founders": a})], ["id"])
    line = read_rows(path)[0]
    assert line["reasoning"] == "[0] r0\n[1] r1" and "https://1.com" in line["citations"]


def test_key_column_clash_is_refused(tmp_path: Path) -> None:
    """A key column named like a review column would make the file ambiguous."""
    with pytest.raises(ConfigError, match="'field'"):
        write_review(tmp_path / "r.csv", [], ["field"])


def _file(tmp_path: Path) -> Path:
    row = MergedRow(key=("acme",), fields={name: answer(None) for name in SCHEMA})
    other = MergedRow(key=("globex",), fields={"city": answer("Paris", run_id="trun_9")})
    path = tmp_path / "o.review.csv"
    write_review(path, [row, other], ["company"])
    return path


KNOWN = {("acme",), ("globex",)}


def test_read_verdicts(tmp_path: Path) -> None:
    """Filled lines become verdicts with typed corrected values; blank verdicts are skipped."""
    path = _file(tmp_path)
    order = list(SCHEMA)
    fill(
        path,
        {
            order.index("city"): {"verdict": " Accept ", "reviewer": "ann", "note": "ok"},
            order.index("year"): {"verdict": "correct", "corrected_value": "1999"},
            order.index("revenue"): {"verdict": "correct", "corrected_value": "2.5e3"},
            order.index("public"): {"verdict": "correct", "corrected_value": "TRUE"},
            order.index("founders"): {"verdict": "correct", "corrected_value": '["Ann", "Bob"]'},
            order.index("hq"): {"verdict": "correct", "corrected_value": '{"city": "Austin", "country": null}'},
            order.index("size"): {"verdict": "reject"},
        },
    )
    got = read_review(path, ["company"], SCHEMA, KNOWN)
    assert [(v.field, v.verdict, v.corrected_value) for v in got] == [
        ("city", "accept", None),
        ("year", "correct", 1999),
        ("revenue", "correct", 2500.0),
        ("public", "correct", True),
        ("founders", "correct", ["Ann", "Bob"]),
        ("hq", "correct", {"city": "Austin", "country": None}),
        ("size", "reject", None),
    ]
    assert got[0].reviewer == "ann" and got[0].note == "ok" and got[0].run_id == "trun_1" and got[0].key == ("acme",)
    assert [v.line for v in got] == [2, 4, 6, 8, 10, 12, 14]


@pytest.mark.parametrize(
    "edits,index,problem",
    [
        ({0: {"company": "initech", "verdict": "accept"}}, 0, "unknown row key company='initech'"),
        ({0: {"field": "ceo", "verdict": "accept"}}, 0, "unknown field 'ceo'"),
        ({1: {"verdict": "maybe"}}, 1, "verdict 'maybe' is not one of accept, correct, reject"),
        ({1: {"corrected_value": "1999"}}, 1, "verdict '(blank)' is not one of"),
        ({1: {"verdict": "correct"}}, 1, "verdict correct needs a corrected_value"),
        ({1: {"verdict": "accept", "corrected_value": "1999"}}, 1, "corrected_value given but verdict is 'accept'"),
        (
            {1: {"verdict": "correct", "corrected_value": "19.5"}},
            1,
            "field 'year': corrected_value '19.5' is not an integer",
        ),
        ({2: {"verdict": "correct", "corrected_value": "lots"}}, 2, "is not a number"),
        ({3: {"verdict": "correct", "corrected_value": "yes"}}, 3, "is not a boolean"),
        ({4: {"verdict": "correct", "corrected_value": "Ann, Bob"}}, 4, "not valid JSON for a field of type array"),
        ({4: {"verdict": "correct", "corrected_value": '["Ann", 3]'}}, 4, "corrected_value[1] is not a string"),
        ({5: {"verdict": "correct", "corrected_value": '{"city": "X"}'}}, 5, "corrected_value lacks key 'country'"),
        (
            {5: {"verdict": "correct", "corrected_value": '{"city": "X", "country": "Y", "zip": 1}'}},
            5,
            "unknown key 'zip'",
        ),
        ({6: {"verdict": "correct", "corrected_value": "medium"}}, 6, 'is not one of "small", "large"'),
        (
            {0: {"verdict": "accept"}, 7: {"field": "city", "company": "acme", "verdict": "reject"}},
            7,
            "second verdict for 'city' of this row (first on line 2)",
        ),
        ({1: {"verdict": "x"}, 2: {"verdict": "y"}, 3: {"verdict": "z"}}, 1, "(and 2 more problems)"),
    ],
)
def test_bad_lines(tmp_path: Path, edits: dict[int, dict[str, str]], index: int, problem: str) -> None:
    """Each bad line raises InputError naming file and line; nothing is returned."""
    line = 2 + 2 * index  # each exported line spans two file lines (two citations, one per line)
    path = _file(tmp_path)
    fill(path, edits)
    with pytest.raises(InputError) as info:
        read_review(path, ["company"], SCHEMA, KNOWN)
    assert info.value.line == line and problem in info.value.reason and str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    "content,line,problem",
    [
        (b"company,field,verdict\n", 1, "header: missing column 'corrected_value'"),
        (b"field,verdict,corrected_value\n", 1, "header: missing column 'company'"),
        (b"company,field,field,verdict,corrected_value\n", 1, "a column name repeats"),
        (b"company,field,verdict,corrected_value\nacme,city,accept,,extra\n", 2, "5 cells but the header has 4"),
        (b'company,field,verdict,corrected_value\nacme,city,"acc"ept,\n', 2, "malformed CSV"),
        (b"company,field,verdict,corrected_value\nacme,city,accept,\xff\n", 2, "not UTF-8"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, line: int | None, problem: str) -> None:
    """Broken headers, ragged lines, bad quoting and bad encoding are refused with a position."""
    path = tmp_path / "r.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_review(path, ["company"], SCHEMA, KNOWN)
    assert info.value.line == line and problem in info.value.reason


def test_line_numbers_count_multiline_cells(tmp_path: Path) -> None:
    """Lines are physical file lines, also after a reasoning cell spanning several lines."""
    path = tmp_path / "r.csv"
    path.write_text(
        'company,field,verdict,corrected_value,note\nacme,city,accept,,"two\nlines"\nacme,year,nope,,\n',
        encoding="utf-8",
    )
    with pytest.raises(InputError) as info:
        read_review(path, ["company"], SCHEMA, KNOWN)
    assert info.value.line == 4


def test_bom_and_short_rows_are_accepted(tmp_path: Path) -> None:
    """A spreadsheet's BOM and dropped trailing empty cells do not matter."""
    path = tmp_path / "r.csv"
    path.write_bytes("\ufeffcompany,field,verdict,corrected_value,note\nacme,city,accept\n".encode())
    assert [v.field for v in read_review(path, ["company"], SCHEMA, KNOWN)] == ["city"]


@given(st.text())
def test_guard_round_trip(s: str) -> None:
    """unguard(guard(s)) == s, and a guarded cell never starts a formula."""
    assert unguard(guard(s)) == s
    g = guard(s)
    assert not g.startswith(("=", "+", "@")) or g[1:].replace(".", "", 1).isdigit()


VALUES = {
    "city": st.text(min_size=1),
    "year": st.integers(-(10**12), 10**12),
    "revenue": st.floats(allow_nan=False, allow_infinity=False),
    "public": st.booleans(),
    "founders": st.lists(st.text(), max_size=3),
    "hq": st.fixed_dictionaries({"city": st.none() | st.text(), "country": st.none() | st.text()}),
    "size": st.sampled_from(["small", "large"]),
}
KEYS = st.text(min_size=1, max_size=8).filter(lambda s: "\x00" not in s)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=100)
@given(
    st.lists(
        st.tuples(KEYS, st.sampled_from(list(SCHEMA)), st.data()),
        min_size=1,
        max_size=6,
        unique_by=lambda t: (t[0], t[1]),
    )
)
def test_round_trip(tmp_path: Path, lines: list[tuple[str, str, Any]]) -> None:
    """Copying each value into corrected_value and marking it `correct` reads back the very same values."""
    path = tmp_path / "rt.review.csv"
    rows, expected = [], []
    for i, (key, field, data) in enumerate(lines):
        value = data.draw(VALUES[field])
        rows.append(MergedRow(key=(key, "x"), fields={field: answer(value, "rejected", run_id=f"trun_{i}")}))
        expected.append(((key, "x"), field, value, f"trun_{i}"))
    assert write_review(path, rows, ["name", "tag"]) == len(rows)
    written = read_rows(path)
    fill(path, {i: {"verdict": "correct", "corrected_value": r["value"]} for i, r in enumerate(written)})
    got = read_review(path, ["name", "tag"], SCHEMA, {k for k, *_ in expected})
    assert [(v.key, v.field, v.corrected_value, v.run_id) for v in got] == expected


def test_round_trip_through_merge(tmp_path: Path) -> None:
    """A merged row from raw results exports its uncertain fields with the kept run's id."""
    r = {
        "run": {"run_id": "trun_a"},
        "output": {
            "content": {"city": "Austin", "year": 1998},
            "basis": [{"field": "city", "confidence": "low", "reasoning": "r"}],
        },
    }
    m = merge([("base", r)], ["city", "year"], GateConfig(), key=("acme",))
    path = tmp_path / "m.review.csv"
    assert write_review(path, [m], ["company"]) == 2
    assert [(x["field"], x["confidence"], x["run_id"]) for x in read_rows(path)] == [
        ("city", "low", "trun_a"),
        ("year", "none", "trun_a"),
    ]
