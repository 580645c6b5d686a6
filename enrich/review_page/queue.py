"""What the review page shows, projected from the journal as `enrich run` wrote it.

The queue is the review file's lines (write.Projection hands every merged row with a line to review to
`on_review`, and review.to_review picks the lines, exactly as for `<output stem>.review.csv`), plus the
lines a reviewer has decided (`human_*`), so the page can count done / left. Lines are sorted by the
model's confidence (least sure first), then key, then field order.

An item is one line with everything a reviewer needs: the row's input, the kept answer with its
reasoning and citations, the answers other processors gave for the same field, and the field's verdict
history. Nothing here writes; verdicts go through job.record_verdicts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from enrich.files import encode_cell
from enrich.gate import HUMAN_DECISIONS, FieldAnswer, MergedRow, answer_of, ordinal
from enrich.job import Job, known_keys
from enrich.journal import Journal
from enrich.processors import strength
from enrich.report import domain_of
from enrich.review import confidence_cell, to_review
from enrich.write import Projection

PAGE_SIZE = 50
STATUSES = ("left", "done", "all")


@dataclass(frozen=True)
class Line:
    """One (row, field) of the queue; `value`, `confidence`, `processor` and `run_id` as the review file has them."""

    row_key: str  # the journal's row key (canonical JSON of the key values)
    key: tuple[str, ...]
    field: str
    value: str
    confidence: str
    processor: str
    run_id: str
    decision: str  # review | rejected (left) or human_accepted | human_corrected | human_rejected (done)
    order: tuple[Any, ...] = dataclasses.field(compare=False, repr=False, default=())

    @property
    def done(self) -> bool:
        return self.decision in HUMAN_DECISIONS

    @property
    def ident(self) -> tuple[str, str]:
        return self.row_key, self.field


def lines_of(merged: MergedRow, row_key: str, fields: Sequence[str]) -> list[Line]:
    """The queue lines of one merged row: its review-file lines, then its lines decided by a reviewer."""
    out = []
    left = dict(to_review(merged))
    for name, answer in merged.fields.items():
        if name not in left and answer.decision not in HUMAN_DECISIONS:
            continue
        model = answer.previous if answer.decision == "human_corrected" and answer.previous else answer
        out.append(
            Line(
                row_key=row_key,
                key=merged.key,
                field=name,
                value=encode_cell(answer.value),
                confidence=confidence_cell(answer),
                processor=answer.processor or "",
                run_id=answer.run_id or "",
                decision=answer.decision,
                order=(ordinal(model.confidence), merged.key, fields.index(name) if name in fields else len(fields)),
            )
        )
    return out


@dataclass
class Queue:
    """The sorted queue and the journal state it was projected from (journal.write_state)."""

    lines: list[Line]
    state: Any
    fields: list[str]

    def __post_init__(self) -> None:
        self.lines.sort(key=lambda ln: ln.order)

    @property
    def left(self) -> int:
        return sum(1 for ln in self.lines if not ln.done)

    @property
    def done(self) -> int:
        return sum(1 for ln in self.lines if ln.done)

    def processors(self) -> list[str]:
        return sorted({ln.processor for ln in self.lines if ln.processor}, key=strength)

    def decisions(self) -> list[str]:
        return sorted({ln.decision for ln in self.lines})

    def select(self, field: str = "", decision: str = "", processor: str = "", status: str = "left") -> list[Line]:
        """The lines of a filter (empty = any), in queue order."""
        return [
            ln
            for ln in self.lines
            if (not field or ln.field == field)
            and (not decision or ln.decision == decision)
            and (not processor or ln.processor == processor)
            and (status == "all" or ln.done == (status == "done"))
        ]

    def replace_rows(self, row_keys: Iterable[str], lines: list[Line], state: Any) -> None:
        """Swap in the fresh lines of some rows (after verdicts on them), keeping the order."""
        gone = set(row_keys)
        self.lines = sorted([ln for ln in self.lines if ln.row_key not in gone] + lines, key=lambda ln: ln.order)
        self.state = state


def projection(job: Job, journal: Journal) -> Projection:
    """The projection `enrich run` writes the output with, for this job."""
    proj = Projection(journal, job.fields, job.cfg.output.reasoning, False, job.cfg)
    proj.review.close()  # the page keeps its lines in memory; no review file is written here
    return proj


def build_queue(job: Job, journal: Journal) -> Queue:
    """Project the whole journal (as the output write does) and collect the queue's lines."""
    proj = projection(job, journal)
    names, keys = list(job.fields), known_keys(journal)
    lines: list[Line] = []
    proj.on_review = lambda merged: lines.extend(lines_of(merged, keys[merged.key], names))
    for _ in proj.chunks():
        pass
    return Queue(lines, journal.write_state(), names)


def _merged_rows(job: Job, journal: Journal, row_keys: Sequence[str]) -> Iterator[tuple[tuple[Any, ...], MergedRow]]:
    """(the journal's row, its merged row) for these rows, decided as Projection.chunks decides them."""
    proj = projection(job, journal)
    for chunk in journal.iter_results(journal.get("epoch", 0), proj.ladder, keys=row_keys):
        verdicts = journal.verdicts_for(Projection.judged(chunk))
        for row in chunk:
            row_key, _rj, _state, run_id, _e, _s, _f, input_hash, results = row
            if results:
                yield row, proj._decide(row_key, results, verdicts.get(row_key), input_hash, run_id)[1]


def row_lines(job: Job, journal: Journal, row_keys: Sequence[str]) -> list[Line]:
    """The queue lines of some rows, fresh from the journal (the same lines build_queue collects for them)."""
    names = list(job.fields)
    return [ln for row, merged in _merged_rows(job, journal, row_keys) for ln in lines_of(merged, row[0], names)]


def safe_href(url: Any) -> str | None:
    """`url` when it may become a link: an absolute http(s) URL with a host and no spaces or control characters;
    None for anything else (`javascript:`, `data:`, relative or malformed), which the page shows as text."""
    text = str(url)
    if not text or text != text.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        return None
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return None
    return text if parts.scheme.lower() in ("http", "https") and host else None


@dataclass(frozen=True)
class Citation:
    url: str
    href: str | None  # None: not a link (shown as inert text)
    domain: str
    title: str
    excerpts: tuple[str, ...]


@dataclass(frozen=True)
class Evidence:
    """One basis entry: the field's own, or one element's (`label` "[0]", "[1]", ...)."""

    label: str
    reasoning: str
    citations: tuple[Citation, ...]


@dataclass(frozen=True)
class Answer:
    processor: str
    value: str
    confidence: str
    decision: str
    run_id: str
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class PastVerdict:
    """One stored verdict on the item's field (oldest first); `stale` once the row's input changed."""

    at: float
    verdict: str
    corrected: str
    reviewer: str
    note: str
    stale: bool


@dataclass(frozen=True)
class Item:
    line: Line
    inputs: tuple[tuple[str, str], ...]
    answer: Answer  # what the output shows (a correction is processor "human")
    model: Answer | None  # the model's answer a correction replaced
    others: tuple[Answer, ...]  # the other processors' answers for the same field, strongest first
    history: tuple[PastVerdict, ...]


def _citations(entry: dict[str, Any]) -> tuple[Citation, ...]:
    out = []
    for c in entry.get("citations") or []:
        if not isinstance(c, dict) or not c.get("url"):
            continue
        excerpts = c.get("excerpts")
        excerpts = excerpts if isinstance(excerpts, list) else []
        out.append(
            Citation(
                url=str(c["url"]),
                href=safe_href(c["url"]),
                domain=domain_of(c["url"]),
                title=str(c.get("title") or ""),
                excerpts=tuple(str(e) for e in excerpts if e is not None),
            )
        )
    return tuple(out)


def _answer(a: FieldAnswer) -> Answer:
    entries = [("", a.basis)] if a.basis else [(f"[{i}]", e) for i, e in enumerate(a.elements)]
    return Answer(
        processor=a.processor or "",
        value=encode_cell(a.value),
        confidence=confidence_cell(a),
        decision=a.decision,
        run_id=a.run_id or "",
        evidence=tuple(
            Evidence(label, str(e.get("reasoning") or ""), _citations(e)) for label, e in entries if isinstance(e, dict)
        ),
    )


def item(job: Job, journal: Journal, row_key: str, field_name: str) -> Item | None:
    """One queue line with its evidence, or None when the row or field is not (or no longer) in the job."""
    if field_name not in job.fields:
        return None
    for row, merged in _merged_rows(job, journal, [row_key]):
        lines = {ln.field: ln for ln in lines_of(merged, row_key, list(job.fields))}
        line = lines.get(field_name)
        kept = merged.fields[field_name]
        if line is None:  # not a line to review (any more): show it all the same, as accepted by the gate
            line = Line(
                row_key,
                merged.key,
                field_name,
                encode_cell(kept.value),
                confidence_cell(kept),
                kept.processor or "",
                kept.run_id or "",
                kept.decision,
            )
        model = kept.previous if kept.decision == "human_corrected" else None
        shown = (model or kept).run_id
        others = [
            answer_of(json.loads(res) if isinstance(res, str) else res, field_name, proc, job.cfg.gate)
            for proc, rid, res in row[8]
            if rid != shown
        ]
        columns = journal.get("columns", [])
        values = json.loads(row[1])
        history = [
            PastVerdict(
                at, verdict, encode_cell(json.loads(cj)) if cj is not None else "", reviewer, note, vh != row[7]
            )
            for f, verdict, cj, reviewer, note, _rid, vh, at in journal.verdicts_for([row_key]).get(row_key, [])
            if f == field_name
        ]
        return Item(
            line=line,
            inputs=tuple((str(c), encode_cell(v)) for c, v in zip(columns, values, strict=False)),
            answer=_answer(kept),
            model=_answer(model) if model is not None else None,
            others=tuple(_answer(a) for a in sorted(others, key=lambda a: strength(a.processor or ""), reverse=True)),
            history=tuple(history),
        )
    return None
