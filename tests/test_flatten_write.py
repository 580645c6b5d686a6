"""flatten.py and write.py: columns, types, confidence as given, formula guard."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from enrich.files import neutralize
from enrich.flatten import coerce, flatten, output_columns

FIELDS = {
    "hq": {"type": ["string", "null"]},
    "year": {"type": ["integer", "null"]},
    "founders": {"type": ["array", "null"], "items": {"type": "string"}},
    "ceo": {
        "type": ["object", "null"],
        "properties": {"name": {"type": ["string", "null"]}, "since": {"type": ["integer", "null"]}},
    },
}


def result(content, basis):
    return {"run": {"run_id": "trun_x"}, "output": {"type": "json", "content": content, "basis": basis}}


def test_columns_in_order_with_nested_objects() -> None:
    names = [c[0] for c in output_columns(FIELDS, reasoning=True)]
    evidence = ["__confidence", "__citations", "__reasoning", "__decision", "__processor"]
    assert names == [
        "hq",
        *("hq" + e for e in evidence),
        "year",
        *("year" + e for e in evidence),
        "founders",
        *("founders" + e for e in evidence),
        "ceo.name",
        "ceo.since",
        *("ceo" + e for e in evidence),
    ]


def test_flatten_values_and_basis() -> None:
    flat = flatten(
        result(
            {"hq": "Austin", "year": "1998", "founders": ["A", "B"], "ceo": {"name": "X", "since": 2020}, "extra": 1},
            [
                {
                    "field": "hq",
                    "confidence": "medium",
                    "reasoning": "r",
                    "citations": [{"url": "https://a"}, {"url": "https://b"}],
                },
                {"field": "year", "confidence": "", "reasoning": "r2", "citations": []},
                {"field": "founders", "confidence": None, "reasoning": "r3"},
            ],
        ),
        FIELDS,
        reasoning=True,
    )
    assert flat["hq"] == "Austin" and flat["hq__confidence"] == "medium"
    assert flat["hq__citations"] == ["https://a", "https://b"] and flat["hq__reasoning"] == "r"
    assert flat["year"] == 1998 and flat["year__confidence"] == ""  # "" kept as the API gave it
    assert flat["founders"] == ["A", "B"] and flat["founders__confidence"] is None
    assert flat["ceo.name"] == "X" and flat["ceo.since"] == 2020
    assert flat["ceo__confidence"] is None and flat["ceo__citations"] is None  # no basis entry at all


def test_flatten_missing_or_malformed_output() -> None:
    for bad in (None, {}, {"output": "html"}, {"output": {"type": "json", "content": None}}):
        flat = flatten(bad, FIELDS, reasoning=False)
        assert set(flat.values()) == {None}


def test_text_output_maps_to_output_column() -> None:
    flat = flatten(
        {
            "output": {
                "type": "text",
                "content": "A company.",
                "basis": [{"field": "output", "confidence": "high", "reasoning": "r", "citations": []}],
            }
        },
        {"output": {"type": "string"}},
        reasoning=False,
    )
    assert flat == {
        "output": "A company.",
        "output__confidence": "high",
        "output__citations": [],
        "output__decision": None,
        "output__processor": None,
    }  # decided by write.py, not here


@given(
    st.dictionaries(
        st.sampled_from(list(FIELDS)),
        st.one_of(st.none(), st.text(), st.integers(), st.floats(), st.lists(st.text()), st.booleans()),
    )
)
def test_flatten_is_total_and_deterministic(content) -> None:
    """Any content shape: every column present, same answer twice, never an exception."""
    a = flatten(result(content, []), FIELDS, reasoning=True)
    assert a == flatten(result(content, []), FIELDS, reasoning=True)
    assert list(a) == [c[0] for c in output_columns(FIELDS, reasoning=True)]


def test_coerce() -> None:
    assert coerce("12", "integer") == 12 and coerce(1.5, "integer") is None and coerce("x", "integer") is None
    assert coerce({"a": 1}, "string") == '{"a": 1}'


def _plain_number(s: str) -> bool:
    """An independent oracle: a decimal a spreadsheet shows as a number (no letters but an exponent)."""
    if not s or s != s.strip() or any(c.isalpha() and c not in "eE" for c in s) or "_" in s:
        return False
    try:
        float(s)
    except ValueError:
        return False
    return True


@given(st.text() | st.sampled_from(["-2", "+3.5", "-1e5", "=1+1", "@SUM(A1)", "-x", "\tcmd", "+", "-", "-inf"]))
def test_formula_guard(s: str) -> None:
    """Text a spreadsheet would evaluate always gets a leading quote; plain numbers stay as they are."""
    out = neutralize(s)
    assert out in (s, "'" + s)
    dangerous = s[:1] in ("=", "+", "-", "@", "\t", "\r", "\x00")
    if dangerous and not _plain_number(s):
        assert out == "'" + s
    if not dangerous:
        assert out == s


def test_formula_guard_cases() -> None:
    assert neutralize("=1+1") == "'=1+1" and neutralize("+SUM(A1)") == "'+SUM(A1)" and neutralize("@x") == "'@x"
    assert neutralize("-2") == "-2" and neutralize("+3.5") == "+3.5" and neutralize("-1e5") == "-1e5"
    assert neutralize("-x") == "'-x" and neutralize("\tcmd") == "'\tcmd" and neutralize("\rcmd") == "'\rcmd"
    assert neutralize("plain") == "plain"
