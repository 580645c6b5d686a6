"""gate.py: confidence -> decisions, merging answers across processors, human verdicts."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrich.config import GateConfig
from enrich.gate import (
    Verdict,
    apply_verdicts,
    confidence_of,
    decide,
    decide_row,
    merge,
    needs_escalation,
    next_processor,
    normalize_confidence,
    ordinal,
)
from enrich.processors import strength


def result(
    run_id: str, content: dict[str, Any], basis: list[dict[str, Any]], processor: str = "core"
) -> dict[str, Any]:
    return {
        "run": {"run_id": run_id, "processor": processor, "status": "completed"},
        "output": {"type": "json", "content": content, "basis": basis},
    }


def entry(field: str, confidence: Any, url: str = "https://e.com") -> dict[str, Any]:
    return {
        "field": field,
        "reasoning": f"because {field}",
        "confidence": confidence,
        "citations": [{"url": url, "title": "T", "excerpts": ["x"]}],
    }


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("high", "high"),
        ("MEDIUM ", "medium"),
        ("low", "low"),
        ("", "none"),
        (None, "none"),
        ("unsure", "none"),
        (0.93, 0.93),
        (1, 1.0),
        ("0.5", 0.5),
        (float("nan"), "none"),
        (True, "none"),
        ([], "none"),
    ],
)
def test_normalize_confidence(raw: Any, expected: Any) -> None:
    """Labels are case-folded; null, "", unknown labels and booleans are "none"; numbers are floats."""
    assert normalize_confidence(raw) == expected


def test_confidence_of_missing_entries_and_elements() -> None:
    """A missing basis entry is "none"; an array without its own entry takes its weakest element."""
    r = result(
        "r",
        {"a": 1, "b": [1, 2], "c": 3},
        [entry("a", "high"), entry("b.1", "low"), entry("b.0", "high"), entry("c", "")],
    )
    assert confidence_of(r, "a") == "high"
    assert confidence_of(r, "b") == "low"
    assert confidence_of(r, "b.0") == "high"
    assert confidence_of(r, "c") == "none"
    assert confidence_of(r, "missing") == "none"
    assert confidence_of(None, "a") == "none"
    assert confidence_of({"output": "garbage"}, "a") == "none"


def test_text_output_field_is_output() -> None:
    """A text output's single basis entry is named "output"."""
    r = {"output": {"type": "text", "content": "md", "basis": [entry("output", "medium")]}}
    assert confidence_of(r, "output") == "medium"
    assert merge([("core", r)], ["output"], GateConfig()).fields["output"].value == "md"


@pytest.mark.parametrize(
    "conf,expected",
    [
        ("high", "accepted"),
        ("medium", "review"),
        ("low", "rejected"),
        ("none", "rejected"),
        ("", "rejected"),
        (None, "rejected"),
        (0.99, "rejected"),  # numbers without thresholds count as "none"
    ],
)
def test_decide_defaults(conf: Any, expected: str) -> None:
    """Default gate: high accepted, medium review, low/none rejected; never "high" by accident."""
    assert decide("f", conf, GateConfig()) == expected


@pytest.mark.parametrize(
    "conf,expected", [(0.95, "accepted"), (0.9, "accepted"), (0.6, "review"), (0.59, "rejected"), ("high", "accepted")]
)
def test_decide_numeric_thresholds(conf: Any, expected: str) -> None:
    """accept_at / review_at are inclusive lower bounds; labels still use the lists."""
    assert decide("f", conf, GateConfig(accept_at=0.9, review_at=0.6)) == expected


def test_field_override_and_element_rule() -> None:
    """[gate.fields.x] changes only x (and x.N); other fields keep the default rule."""
    g = GateConfig(fields={"x": {"accept": ["high", "medium"]}})
    assert decide("x", "medium", g) == "accepted"
    assert decide("x.3", "medium", g) == "accepted"
    assert decide("y", "medium", g) == "review"


def test_decide_row_and_escalation() -> None:
    """decide_row gates each field; needs_escalation looks only at the configured decisions."""
    r = result("r", {"a": 1, "b": 2}, [entry("a", "high"), entry("b", "medium")])
    d = decide_row(r, ["a", "b", "c"], GateConfig())
    assert d == {"a": "accepted", "b": "review", "c": "rejected"}
    assert needs_escalation(d, ["rejected"])
    assert not needs_escalation({"a": "accepted", "b": "review"}, ["rejected"])
    assert needs_escalation({"a": "accepted", "b": "review"}, ["rejected", "review"])
    assert not needs_escalation({"a": "human_rejected"}, ["rejected", "review"])


@pytest.mark.parametrize(
    "ladder,tried,expected",
    [
        (["lite", "core", "pro"], ["lite"], "core"),
        (["lite", "core", "pro"], ["lite", "core"], "pro"),
        (["lite", "core", "pro"], ["lite", "core", "pro"], None),
        (["lite-fast", "base", "core"], [], "lite-fast"),
        (["lite", "core", "pro"], ["core-fast"], "core"),  # same tier, standard is stronger
    ],
)
def test_next_processor(ladder: list[str], tried: list[str], expected: str | None) -> None:
    """The next ladder step is the first one stronger than everything tried."""
    assert next_processor(ladder, tried) == expected


def test_merge_keeps_cheap_high_answer() -> None:
    """A high answer from lite survives a medium one from pro; the other field comes from pro."""
    lite = result("r1", {"a": "lite-a", "b": "lite-b"}, [entry("a", "high"), entry("b", "low")])
    pro = result("r2", {"a": "pro-a", "b": "pro-b"}, [entry("a", "medium"), entry("b", "high")])
    m = merge([("pro", pro), ("lite", lite)], ["a", "b"], GateConfig(), key=("acme",))
    assert (m.fields["a"].value, m.fields["a"].processor, m.fields["a"].run_id) == ("lite-a", "lite", "r1")
    assert (m.fields["b"].value, m.fields["b"].processor, m.fields["b"].decision) == ("pro-b", "pro", "accepted")
    assert m.fields["b"].basis == entry("b", "high")
    assert m.processors == ("lite", "pro") and m.key == ("acme",)
    assert m.decisions == {"a": "accepted", "b": "accepted"}


def test_merge_tie_goes_to_stronger_processor() -> None:
    """Equal confidence: the stronger processor's answer is kept."""
    a = result("r1", {"x": "weak"}, [entry("x", "medium")])
    b = result("r2", {"x": "strong"}, [entry("x", "medium")])
    for order in itertools.permutations([("base", a), ("ultra", b)]):
        assert merge(order, ["x"], GateConfig()).fields["x"].value == "strong"


def test_merge_without_results() -> None:
    """No completed run: every field is empty, "none" and rejected."""
    m = merge([], ["x"], GateConfig())
    assert (m.fields["x"].value, m.fields["x"].confidence, m.fields["x"].decision) == (None, "none", "rejected")


def test_merge_keeps_element_entries() -> None:
    """The kept answer carries the element-level entries of its own result."""
    r = result("r", {"f": ["a", "b"]}, [entry("f.0", "high"), entry("f.1", "medium")])
    got = merge([("core", r)], ["f"], GateConfig()).fields["f"]
    assert [e["field"] for e in got.elements] == ["f.0", "f.1"] and got.confidence == "medium" and got.basis is None


LABELS = st.sampled_from(["high", "medium", "low", "", None, "HIGH", "weird"])
CONFS = st.one_of(LABELS, st.floats(0, 1))
PROCS = st.sampled_from(["lite", "lite-fast", "base", "core", "core-fast", "pro", "ultra", "ultra8x"])


@st.composite
def runs(draw: Any) -> list[tuple[str, dict[str, Any]]]:
    n = draw(st.integers(1, 5))
    out = []
    for i in range(n):
        basis = [entry(f, draw(CONFS)) for f in ("a", "b") if draw(st.booleans())]
        out.append((draw(PROCS), result(f"run{i}", {"a": f"a{i}", "b": f"b{i}"}, basis)))
    return out


GATES = st.sampled_from(
    [
        GateConfig(),
        GateConfig(accept_at=0.8, review_at=0.5),
        GateConfig(accept=["high", "medium"], review=[], reject=["low", "none"], review_at=0.3),
        GateConfig(accept=[], review=["high", "medium", "low"], reject=["none"]),
    ]
)


@given(runs(), GATES)
def test_merge_never_lowers_decision_or_confidence(rs: list[tuple[str, dict[str, Any]]], gate: GateConfig) -> None:
    """The kept answer's decision and confidence are at least those of every single input."""
    rank = {"rejected": 0, "review": 1, "accepted": 2}
    m = merge(rs, ["a", "b"], gate)
    for f in ("a", "b"):
        kept = m.fields[f]
        for _, r in rs:
            d = decide(f, confidence_of(r, f), gate)
            assert rank[kept.decision] >= rank[d]
            if d == kept.decision:
                assert ordinal(kept.confidence) >= ordinal(confidence_of(r, f))


@given(runs(), GATES, st.randoms())
def test_merge_ignores_input_order(rs: list[tuple[str, dict[str, Any]]], gate: GateConfig, rnd: Any) -> None:
    """Shuffling the inputs never changes the merged row."""
    shuffled = list(rs)
    rnd.shuffle(shuffled)
    assert merge(rs, ["a", "b"], gate) == merge(shuffled, ["a", "b"], gate)


@given(runs(), GATES)
def test_merge_tie_prefers_stronger(rs: list[tuple[str, dict[str, Any]]], gate: GateConfig) -> None:
    """Among inputs as good as the kept one, none is on a stronger processor."""
    m = merge(rs, ["a", "b"], gate)
    for f in ("a", "b"):
        kept = m.fields[f]
        for proc, r in rs:
            c = confidence_of(r, f)
            if decide(f, c, gate) == kept.decision and ordinal(c) == ordinal(kept.confidence):
                assert strength(proc) <= strength(kept.processor or "")


def _merged() -> Any:
    r = result("r1", {"a": "A", "b": "B", "c": "C"}, [entry("a", "medium"), entry("b", "low"), entry("c", "low")])
    return merge([("core", r)], ["a", "b", "c"], GateConfig(), key=("k1",))


def test_apply_verdicts() -> None:
    """accept/reject keep the value; correct replaces it and records the model answer."""
    m = apply_verdicts(
        _merged(),
        [
            Verdict(("k1",), "a", "accept", run_id="r1"),
            Verdict(("k1",), "b", "correct", corrected_value="B2", reviewer="ann"),
            Verdict(("k1",), "c", "reject"),
        ],
    )
    a, b, c = m.fields["a"], m.fields["b"], m.fields["c"]
    assert (a.decision, a.value, a.processor) == ("human_accepted", "A", "core")
    assert (b.decision, b.value, b.processor, b.run_id, b.confidence) == (
        "human_corrected",
        "B2",
        "human",
        None,
        "human",
    )
    assert b.previous is not None and b.previous.value == "B" and b.previous.run_id == "r1"
    assert (c.decision, c.value) == ("human_rejected", "C")
    assert not needs_escalation(m.decisions, ["rejected", "review"])
    again = apply_verdicts(m, [Verdict(("k1",), "b", "correct", corrected_value="B3")])
    assert again.fields["b"].previous is not None and again.fields["b"].previous.value == "B"


def test_stale_verdict_is_not_applied() -> None:
    """An accept of a run that is no longer the kept answer is skipped and reported."""
    v = Verdict(("k1",), "a", "accept", run_id="old-run")
    m = apply_verdicts(_merged(), [v])
    assert m.fields["a"].decision == "review" and m.stale_verdicts == (v,)


@pytest.mark.parametrize("verdict", [Verdict(("other",), "a", "accept"), Verdict(("k1",), "zzz", "accept")])
def test_apply_verdicts_refuses_wrong_row_or_field(verdict: Verdict) -> None:
    """A verdict for another row or an unknown field is a programming error."""
    with pytest.raises(ValueError):
        apply_verdicts(_merged(), [verdict])
