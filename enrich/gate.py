"""Pure: basis confidence -> per-field decisions; merge answers from several processors; human verdicts.

A completed run's raw result is `{"run": {...}, "output": {"content": ..., "basis": [...]}}`.
Each output field gets a decision from the `[gate]` config (config.GateConfig):

    accepted | review | rejected                       (from confidence)
    human_accepted | human_corrected | human_rejected  (from a review file, see review.py)

Confidence is normalised first: the API's labels "high"/"medium"/"low"; null, "", an unknown
label or a missing basis entry all become "none" (never "high"); numbers become floats and are
judged by the gate's thresholds.

When a row was run on several processors (escalation), `merge` keeps, per field, the answer
with the best decision, then the best confidence, then the stronger processor, so a "high"
answer from a cheap tier is never thrown away by a worse one from an expensive tier.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from enrich.config import GateConfig, GateRule
from enrich.processors import strength

Confidence = str | float  # "high" | "medium" | "low" | "none" | a number
GateDecision = Literal["accepted", "review", "rejected"]
HUMAN_DECISIONS = ("human_accepted", "human_corrected", "human_rejected")
_DECISION_RANK = {"rejected": 0, "review": 1, "accepted": 2}
_LABEL_ORDINAL = {"none": 0.0, "low": 1 / 3, "medium": 2 / 3, "high": 1.0}
HUMAN = "human"  # processor (and confidence) of a human-corrected value


def normalize_confidence(raw: Any) -> Confidence:
    """The API's raw confidence as "high"|"medium"|"low"|"none" or a finite float.

    >>> normalize_confidence(" High"), normalize_confidence(""), normalize_confidence(None), normalize_confidence(0.8)
    ('high', 'none', 'none', 0.8)
    """
    if isinstance(raw, bool) or raw is None:
        return "none"
    if isinstance(raw, int | float):
        return float(raw) if math.isfinite(raw) else "none"
    if isinstance(raw, str):
        text = raw.strip().casefold()
        if text in _LABEL_ORDINAL:
            return text
        try:
            number = float(text)
        except ValueError:
            return "none"
        return number if math.isfinite(number) else "none"
    return "none"


def ordinal(confidence: Confidence) -> float:
    """A number that orders confidences: labels map to 0, 1/3, 2/3, 1; numbers are themselves.

    Only used to order answers that already got the same decision (labels and numbers
    hardly ever meet in one field), so the mixed scale never overrides a gate threshold.
    """
    if isinstance(confidence, float | int):
        return float(confidence)
    return _LABEL_ORDINAL.get(confidence, 0.0)


def output_of(result: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(content, basis by field) of a raw result; text outputs become `{"output": text}`.

    >>> output_of({"output": {"content": {"a": 1}, "basis": [{"field": "a", "confidence": "low"}]}})
    ({'a': 1}, {'a': {'field': 'a', 'confidence': 'low'}})
    """
    output = result.get("output") if isinstance(result, Mapping) else None
    if not isinstance(output, Mapping):
        return {}, {}
    content = output.get("content")
    if output.get("type") == "text" or isinstance(content, str):
        content = {"output": content}
    basis: dict[str, dict[str, Any]] = {}
    for entry in output.get("basis") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("field"), str):
            basis.setdefault(entry["field"], dict(entry))  # the first entry of a field wins
    return (dict(content) if isinstance(content, Mapping) else {}), basis


def element_entries(basis: Mapping[str, dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """Element-level basis entries (`field.0`, `field.1`, …; field-basis beta) in index order."""
    prefix = field + "."
    if len(basis) <= 1 and field in basis:  # the usual shape: no element entries at all
        return []
    found = [
        (int(name[len(prefix) :]), entry)
        for name, entry in basis.items()
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    ]
    return [entry for _, entry in sorted(found, key=lambda pair: pair[0])]


def confidence_of(result: Mapping[str, Any] | None, field: str) -> Confidence:
    """The normalised confidence the result gives `field` ("none" when it gives none).

    Without an entry for the field itself but with element entries (`founders.0`, …), the
    array is as sure as its least sure element.

    >>> r = {"output": {"content": {}, "basis": [{"field": "f.0", "confidence": "high"},
    ...                                           {"field": "f.1", "confidence": "low"}]}}
    >>> confidence_of(r, "f"), confidence_of(r, "f.0"), confidence_of(r, "g")
    ('low', 'high', 'none')
    """
    return _confidence_in(output_of(result)[1], field)


def _confidence_in(basis: Mapping[str, dict[str, Any]], field: str) -> Confidence:
    if field in basis:
        return normalize_confidence(basis[field].get("confidence"))
    elements = element_entries(basis, field)
    if elements:
        return min((normalize_confidence(e.get("confidence")) for e in elements), key=ordinal)
    return "none"


def decide(field: str, confidence: Confidence, gate_cfg: GateConfig | GateRule) -> GateDecision:
    """Gate one field's confidence: labels by the rule's lists, numbers by its thresholds.

    >>> g = GateConfig(accept_at=0.9, review_at=0.6)
    >>> decide("x", "high", g), decide("x", "none", g), decide("x", 0.75, g), decide("x", 0.2, g)
    ('accepted', 'rejected', 'review', 'rejected')
    >>> decide("x", "0.95", g) == decide("x", 0.95, g) == "accepted"   # a number sent as text is a number
    True
    """
    rule = gate_cfg.rule(field) if isinstance(gate_cfg, GateConfig) else gate_cfg
    confidence = normalize_confidence(confidence)
    if isinstance(confidence, float):
        if rule.accept_at is None and rule.review_at is None:
            return rule.decision_of_level("none")
        if rule.accept_at is not None and confidence >= rule.accept_at:
            return "accepted"
        if rule.review_at is not None and confidence >= rule.review_at:
            return "review"
        return "rejected"
    return rule.decision_of_level(confidence)


def decide_row(result: Mapping[str, Any] | None, fields: Iterable[str], gate_cfg: GateConfig) -> dict[str, str]:
    """Decision per field for one result: `{"founded_year": "accepted", "hq_city": "review"}`."""
    basis = output_of(result)[1]
    return {f: decide(f, _confidence_in(basis, f), gate_cfg) for f in fields}


def needs_escalation(decisions: Mapping[str, str], on: Iterable[str]) -> bool:
    """True when any field's decision is one of `on` (escalate.on, e.g. ["rejected", "review"]).

    Human decisions never escalate.

    >>> needs_escalation({"a": "accepted", "b": "review"}, ["rejected"])
    False
    """
    wanted = set(on)
    return any(d in wanted for d in decisions.values())


def next_processor(ladder: Sequence[str], tried: Iterable[str]) -> str | None:
    """The first ladder step stronger than everything already tried, or None when exhausted.

    >>> next_processor(["lite", "core", "pro"], ["lite"]), next_processor(["lite", "core"], ["core"])
    ('core', None)
    """
    best = max((strength(p) for p in tried), default=(-2, 0))
    return next((p for p in ladder if strength(p) > best), None)


@dataclass(frozen=True)
class FieldAnswer:
    """The answer kept for one field, with where it came from.

    `basis` is the field's basis entry (None when the result had none); `elements` are its
    element-level entries from the same result; `previous` is the model answer a human
    correction replaced (for the audit trail).
    """

    value: Any
    confidence: Confidence
    decision: str
    processor: str | None
    run_id: str | None
    basis: dict[str, Any] | None = None
    elements: tuple[dict[str, Any], ...] = ()
    previous: FieldAnswer | None = None


@dataclass(frozen=True)
class Verdict:
    """One reviewer decision on one (row, field), as read from a review file.

    `run_id` is the run whose answer was reviewed: an accept/reject of an answer that has
    since been replaced is stale and is not applied. `line` points back into the file; `value`
    is the value cell of that line (an accept beside an edited value is refused: job.apply_review).
    """

    key: tuple[str, ...]
    field: str
    verdict: Literal["accept", "correct", "reject"]
    corrected_value: Any = None
    reviewer: str = ""
    note: str = ""
    run_id: str | None = None
    line: int | None = None
    value: str | None = None  # the review file's value cell as the reviewer left it (None: column deleted)


@dataclass(frozen=True)
class MergedRow:
    """The kept answer per field for one row, plus the processors that were merged."""

    fields: dict[str, FieldAnswer]
    key: tuple[str, ...] = ()
    processors: tuple[str, ...] = ()
    stale_verdicts: tuple[Verdict, ...] = field(default=())

    @property
    def decisions(self) -> dict[str, str]:
        return {name: a.decision for name, a in self.fields.items()}

    @property
    def content(self) -> dict[str, Any]:
        return {name: a.value for name, a in self.fields.items()}


def _run_id(result: Mapping[str, Any] | None) -> str | None:
    run = result.get("run") if isinstance(result, Mapping) else None
    rid = run.get("run_id") if isinstance(run, Mapping) else None
    return rid if isinstance(rid, str) else None


def answer_of(
    result: Mapping[str, Any] | None, field_name: str, processor: str | None, gate_cfg: GateConfig
) -> FieldAnswer:
    """One field's answer in one raw result, gated."""
    content, basis = output_of(result)
    conf = _confidence_in(basis, field_name)
    return FieldAnswer(
        value=content.get(field_name),
        confidence=conf,
        decision=decide(field_name, conf, gate_cfg),
        processor=processor,
        run_id=_run_id(result),
        basis=basis.get(field_name),
        elements=tuple(element_entries(basis, field_name)),
    )


def _rank(a: FieldAnswer) -> tuple[int, float, tuple[int, int], str]:
    # decision first (the gate is what users configured), then confidence, then processor
    # strength; the run id only makes the order total so input order never matters
    return (_DECISION_RANK.get(a.decision, -1), ordinal(a.confidence), strength(a.processor or ""), a.run_id or "")


def merge(
    results_by_processor: Iterable[tuple[str, Mapping[str, Any] | None]],
    fields: Iterable[str],
    gate_cfg: GateConfig,
    key: tuple[str, ...] = (),
) -> MergedRow:
    """Per field, keep the best answer among the row's results (one per processor tried).

    Best = better decision, then better confidence, then the stronger processor. With no
    results every field is empty, "none" and gated as such.

    >>> def r(p, c): return (p, {"run": {"run_id": p}, "output": {"content": {"x": p},
    ...                          "basis": [{"field": "x", "confidence": c}]}})
    >>> m = merge([r("lite", "high"), r("pro", "medium")], ["x"], GateConfig())
    >>> m.fields["x"].value, m.fields["x"].decision
    ('lite', 'accepted')
    """
    results = list(results_by_processor)
    kept: dict[str, FieldAnswer] = {}
    for name in fields:
        answers = [answer_of(result, name, proc, gate_cfg) for proc, result in results]
        kept[name] = max(answers, key=_rank) if answers else answer_of(None, name, None, gate_cfg)
    tried = tuple(sorted({p for p, _ in results}, key=strength))
    return MergedRow(fields=kept, key=key, processors=tried)


def apply_verdicts(merged: MergedRow, verdicts: Iterable[Verdict]) -> MergedRow:
    """Apply this row's reviewer verdicts; a human decision is final from then on.

    accept -> human_accepted (value kept); reject -> human_rejected (value kept for the
    audit; writers blank it); correct -> human_corrected with the reviewer's value,
    processor and confidence "human", and the model answer kept in `previous`. An accept or
    reject of a run that is no longer the kept answer is stale: skipped, listed in
    `stale_verdicts`. Raises ValueError for a verdict of another row or an unknown field.
    """
    fields = dict(merged.fields)
    stale = list(merged.stale_verdicts)
    for v in verdicts:
        if merged.key and v.key != merged.key:
            raise ValueError(f"verdict for row {v.key!r} applied to row {merged.key!r}")
        if v.field not in fields:
            raise ValueError(f"verdict for unknown field {v.field!r}")
        answer = fields[v.field]
        if v.verdict == "correct":
            base = answer.previous if answer.decision == "human_corrected" else answer
            fields[v.field] = FieldAnswer(
                value=v.corrected_value,
                confidence=HUMAN,
                decision="human_corrected",
                processor=HUMAN,
                run_id=None,
                previous=base,
            )
        elif v.run_id and v.run_id != answer.run_id:
            stale.append(v)
        else:
            decision = "human_accepted" if v.verdict == "accept" else "human_rejected"
            fields[v.field] = replace(answer, decision=decision)
    return replace(merged, fields=fields, stale_verdicts=tuple(stale))
