"""The evidence file: every field's basis in long format, for audit trails and replay.

One line per (row key, field, citation): key columns, then

    field, value, confidence, decision, processor, run_id, reasoning, citation, url, title, excerpts

`citation` is the citation's index in its basis entry (null on the single line of a field
with no citations, or with no basis entry at all, so every field of every row appears).
With the field-basis beta, array fields also get element lines named `founders.0`,
`founders.1`, … carrying the element's own value, confidence and citations.
`value` is text as is and anything else as JSON (one column type for all fields);
`excerpts` is a list (Parquet) or a JSON array (CSV). CSV cells are formula-guarded.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from enrich.config import GateConfig
from enrich.errors import ConfigError
from enrich.files import PARQUET_SUFFIXES, atomic_write, encode_cell, guard
from enrich.gate import FieldAnswer, MergedRow, answer_of, decide, normalize_confidence

BASIS_COLUMNS = (
    "field",
    "value",
    "confidence",
    "decision",
    "processor",
    "run_id",
    "reasoning",
    "citation",
    "url",
    "title",
    "excerpts",
)
BASIS_CHUNK = 5_000  # lines per Parquet row group / per batch: memory stays flat on any input size


def _entry_lines(head: dict[str, Any], entry: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
    cites = [c for c in ((entry or {}).get("citations") or []) if isinstance(c, Mapping)]
    reasoning = (entry or {}).get("reasoning")
    head = {**head, "reasoning": None if reasoning is None else str(reasoning)}
    if not cites:
        yield {**head, "citation": None, "url": None, "title": None, "excerpts": None}
    for i, c in enumerate(cites):
        excerpts = c.get("excerpts")
        yield {
            **head,
            "citation": i,
            "url": None if c.get("url") is None else str(c["url"]),
            "title": None if c.get("title") is None else str(c["title"]),
            "excerpts": [str(e) for e in excerpts] if isinstance(excerpts, list) else None,
        }


def _conf_text(confidence: Any) -> str:
    return confidence if isinstance(confidence, str) else repr(float(confidence))


def answer_lines(
    key: Mapping[str, Any], name: str, answer: FieldAnswer, gate_cfg: GateConfig | None = None
) -> Iterator[dict[str, Any]]:
    """The lines of one field: its own entry's citations, then each element entry's.

    Element decisions use the field's rule when `gate_cfg` is given, else the field's decision.
    """
    base = {**key, "processor": answer.processor, "run_id": answer.run_id}
    yield from _entry_lines(
        {
            **base,
            "field": name,
            "value": encode_cell(answer.value),
            "confidence": _conf_text(answer.confidence),
            "decision": answer.decision,
        },
        answer.basis,
    )
    for element in answer.elements:
        ename = str(element.get("field"))
        index = int(ename.rsplit(".", 1)[1])
        items = answer.value if isinstance(answer.value, list) else []
        conf = normalize_confidence(element.get("confidence"))
        decision = decide(ename, conf, gate_cfg) if gate_cfg is not None else answer.decision
        yield from _entry_lines(
            {
                **base,
                "field": ename,
                "value": encode_cell(items[index] if index < len(items) else None),
                "confidence": _conf_text(conf),
                "decision": decision,
            },
            element,
        )


def basis_rows(
    row_key_values: Mapping[str, Any],
    merged_or_result: MergedRow | Mapping[str, Any] | None,
    decisions: Mapping[str, str] | None = None,
    processor: str | None = None,
    run_id: str | None = None,
    gate_cfg: GateConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Long-format evidence lines for one row, from a merged row or from one raw result.

    For a raw result, `decisions` (field -> decision) names the fields and their decisions;
    `processor` and `run_id` default to the result's own. For a MergedRow they come from it.

    >>> r = {"run": {"run_id": "trun_1", "processor": "base"}, "output": {"content": {"city": "Austin"},
    ...      "basis": [{"field": "city", "reasoning": "r", "confidence": "high",
    ...                 "citations": [{"url": "https://a", "excerpts": ["HQ: Austin"]}]}]}}
    >>> [(x["field"], x["value"], x["url"], x["excerpts"]) for x in basis_rows({"id": "1"}, r, {"city": "accepted"})]
    [('city', 'Austin', 'https://a', ['HQ: Austin'])]
    """
    key = dict(row_key_values)
    if isinstance(merged_or_result, MergedRow):
        for name, answer in merged_or_result.fields.items():
            yield from answer_lines(key, name, answer, gate_cfg)
        return
    run = (merged_or_result or {}).get("run") or {}
    processor = processor if processor is not None else run.get("processor")
    scratch = GateConfig()  # only to build the answer; the decision comes from `decisions`
    for name, decision in (decisions or {}).items():
        answer = answer_of(merged_or_result, name, processor, scratch)
        answer = FieldAnswer(
            answer.value,
            answer.confidence,
            decision,
            processor,
            run_id if run_id is not None else answer.run_id,
            answer.basis,
            answer.elements,
        )
        yield from answer_lines(key, name, answer, gate_cfg)


def _chunks(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    it = iter(rows)
    while chunk := list(islice(it, BASIS_CHUNK)):
        yield chunk


def _csv_cell(value: Any, formula_guard: bool) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    text = encode_cell(value)
    return guard(text) if formula_guard else text


def write_basis(
    path: Path, rows: Iterable[dict[str, Any]], key_columns: Sequence[str], *, formula_guard: bool = True
) -> int:
    """Stream `rows` (from basis_rows) into `path` (.parquet/.pq or .csv) atomically; return the line count.

    Memory is bounded by BASIS_CHUNK lines. Raises ConfigError for another extension or a
    key column named like a basis column; on any error the previous file is left untouched.
    """
    path = Path(path)
    if clash := [k for k in key_columns if k in BASIS_COLUMNS]:
        raise ConfigError(f"key column {clash[0]!r} has the name of a basis-file column; rename it in the input")
    columns = [*key_columns, *BASIS_COLUMNS]
    count = 0
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        types = {"citation": pa.int32(), "excerpts": pa.list_(pa.string())}
        schema = pa.schema([pa.field(c, types.get(c, pa.string())) for c in columns])

        def write(fp: Any) -> None:
            nonlocal count
            with pq.ParquetWriter(fp, schema, compression="zstd") as writer:
                for chunk in _chunks(rows):
                    arrays = []
                    for c in columns:
                        values = [r.get(c) for r in chunk]
                        if c in key_columns:
                            values = [None if v is None else str(v) for v in values]
                        arrays.append(pa.array(values, type=schema.field(c).type))
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                    count += len(chunk)
    elif suffix == ".csv":

        def write(fp: Any) -> None:
            nonlocal count
            text = io.TextIOWrapper(fp, encoding="utf-8", newline="")
            out = csv.writer(text, lineterminator="\r\n")  # RFC 4180; "\n" leaves a lone \r unquoted
            out.writerow([_csv_cell(c, formula_guard) for c in columns])
            for chunk in _chunks(rows):
                out.writerows([_csv_cell(r.get(c), formula_guard) for c in columns] for r in chunk)
                count += len(chunk)
            text.flush()
            text.detach()
    else:
        raise ConfigError(f"{path}: the basis file must end in .parquet, .pq or .csv")
    atomic_write(path, write)
    return count
