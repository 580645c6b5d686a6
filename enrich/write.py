"""Stage 4, write: project the journal into the output file and a JSON run report.

Every row of the current input appears exactly once, in input order, with all input
columns unchanged, then the output columns (flatten.py), then `_enrich_status`,
`_enrich_error`, `_enrich_run_id`, `_enrich_latency_s`. The file is written to a temp file in the same
directory (mode 0600), fsynced and renamed over the target, so a reader never sees half an
output. CSV output neutralises spreadsheet formulas; Parquet output is typed (list columns
stay lists) and carries the report in its key-value metadata; .xlsx output is typed and
formatted (xlsx.py). The output is a rebuildable projection: `enrich export` rewrites it
from the journal alone. Beside it go `<output>.report.json` and `<output stem>.report.html`
(report.py collects the numbers, report_html.py draws them).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import ctypes
import gc
import io
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from enrich.calibrate import calibration
from enrich.config import GateConfig, digest, output_format_problem
from enrich.decide import decided
from enrich.errors import ConfigError
from enrich.files import (
    atomic_json,
    atomic_write,
    encode_cell,
    html_report_path,
    is_parquet,
    neutralize,
    report_json_path,
    review_path,
)
from enrich.flatten import META_COLUMNS, Column, flatten, output_columns
from enrich.gate import MergedRow, decide_row, merge
from enrich.journal import Journal, RowState
from enrich.processors import strength
from enrich.read import from_json_values
from enrich.report import RunStats
from enrich.report_html import render_html
from enrich.review import review_lines, write_review_cells
from enrich.spec import main_type
from enrich.xlsx import EXCEL_MAX_CELL_CHARS, EXCEL_MAX_ROWS, longest_cell, to_frame, write_workbook

# `_enrich_status` of an output row: the one vocabulary users see (README, "Output columns").
OutputStatus = Literal[
    "completed", "failed", "timed_out", "action_required", "unknown", "pending", "skipped_budget", "skipped"
]
STATUS: dict[RowState, OutputStatus] = {
    "done": "completed",
    "failed": "failed",
    "timed_out": "timed_out",
    "action_required": "action_required",
    "intent": "unknown",
    "unknown": "unknown",
    "submitted": "pending",
    "pending": "pending",
    "skipped": "skipped",  # not selected by `[input] where`: not researched, by design (not a failure)
}
WRITE_CHUNK = 2_000  # rows per read from the journal and per Parquet row group


def output_status(state: RowState, budget_exhausted: bool) -> OutputStatus:
    if state == "pending" and budget_exhausted:
        return "skipped_budget"
    return STATUS[state]


def _arrow_type(kind: str, schema: dict[str, Any] | None) -> Any:
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "citations":
        return pa.list_(pa.string())
    if kind == "array":
        ik = main_type((schema or {}).get("items"))
        return pa.list_(_arrow_type(ik if ik in ("integer", "number", "boolean") else "string", None))
    return pa.string()


class _Spill:
    """Review lines collected while projecting, kept in an anonymous temp file (one JSON list per line)."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 (closed after lines())

    def add(self, merged: Any) -> None:
        for cells in review_lines(merged, len(merged.key)):
            self.file.write(json.dumps(cells, ensure_ascii=False) + "\n")

    def lines(self) -> Any:
        self.file.seek(0)
        for line in self.file:
            yield json.loads(line)

    def close(self) -> None:
        self.file.close()


class Projection:
    """Turns journal rows into output records and collects the report's statistics."""

    def __init__(
        self,
        journal: Journal,
        fields: dict[str, dict[str, Any]],
        reasoning: bool,
        budget_exhausted: bool,
        cfg: Any = None,
    ):
        self.journal = journal
        self.cfg = cfg
        self.gate = cfg.gate if cfg is not None else GateConfig()
        self.ladder: list[str] = cfg.ladder if cfg is not None else [str(journal.get("processor") or "")]
        self.review = _Spill()  # review-file lines, spilled to a temp file: memory stays flat
        # receives every merged row with a line to review or a reviewer's verdict (the review page collects them)
        self.on_review: Callable[[MergedRow], None] = self.review.add
        self.pending_reason: str | None = None  # why rows are still pending (the job stopped early)
        self.names = list(fields)
        self.fields, self.reasoning, self.budget_exhausted = fields, reasoning, budget_exhausted
        self.columns: list[Column] = output_columns(fields, reasoning)
        self.input_columns: list[str] = journal.get("columns", [])
        self.statuses: Counter[str] = Counter()
        self.confidence: dict[str, Counter[str]] = {f: Counter() for f in fields}
        self.stats = RunStats(
            fields, self.columns, str(journal.get("processor") or ""), self.ladder, not journal.times_runs()
        )
        self.rows = 0

    def header(self) -> list[str]:
        return [*self.input_columns, *(c[0] for c in self.columns), *META_COLUMNS]

    def _decide(
        self, row_key: str, results: list[Any], verdicts: list[Any] | None, input_hash: str, run_id: str | None
    ) -> tuple[dict[str, Any] | None, Any]:
        """The row's answers merged across tiers and human verdicts, as one result for flatten()."""
        names = list(self.fields)
        key = tuple(str(v) for v in json.loads(row_key))
        if self.cfg is None:  # export without a config: gate defaults over what is stored
            merged = _default_decided(results, names, self.gate, key)
        else:
            merged = decided(results, names, self.cfg, key, verdicts, input_hash)
        run = next((r for _p, rid, r in results if rid == run_id), None)
        run = (json.loads(run) if isinstance(run, str) else run).get("run") if run else None
        content = {n: (None if a.decision == "human_rejected" else a.value) for n, a in merged.fields.items()}
        basis = [a.basis for a in merged.fields.values() if a.basis and a.decision != "human_corrected"]
        basis += [e for a in merged.fields.values() for e in a.elements]
        return {"run": run or {}, "output": {"type": "json", "content": content, "basis": basis}}, merged

    @staticmethod
    def judged(chunk: list[tuple[Any, ...]]) -> list[str]:
        """The row keys of an `iter_results` chunk whose verdicts apply: done rows, and rows climbing the ladder
        (a stronger run waiting or failed), which show their best answer so far and so a reviewer's verdicts."""
        return [r[0] for r in chunk if r[2] == "done" or (r[2] != "skipped" and r[8])]

    def chunks(self) -> Any:
        epoch = self.journal.get("epoch", 0)
        for chunk in self.journal.iter_results(epoch, self.ladder, chunk=WRITE_CHUNK):
            records = []
            verdicts = self.journal.verdicts_for(self.judged(chunk))
            for row_key, row_json, state, run_id, error, submitted_at, finished_at, input_hash, results in chunk:
                values = json.loads(row_json)
                result, merged = None, None
                if state == "skipped":  # researched columns stay empty, even when its input was researched elsewhere
                    results = []
                if state == "done" and len(results) == 1 and not verdicts.get(row_key):
                    # the common case: one answer, no reviewer: gate it without merging anything
                    result = json.loads(results[0][2])
                    decisions = decide_row(result, self.names, self.gate)
                    flat = flatten(result, self.fields, self.reasoning, self.columns)
                    for name, d in decisions.items():
                        flat[f"{name}__decision"] = d
                        flat[f"{name}__processor"] = results[0][0]
                    if any(d in ("review", "rejected") for d in decisions.values()):
                        parsed = [(results[0][0], results[0][1], result)]
                        self.on_review(self._decide(row_key, parsed, None, input_hash, run_id)[1])
                elif results:  # several tiers, reviewer verdicts, or a stronger tier still pending
                    result, merged = self._decide(row_key, results, verdicts.get(row_key), input_hash, run_id)
                    flat = flatten(result, self.fields, self.reasoning, self.columns)
                else:
                    flat = flatten(None, self.fields, self.reasoning, self.columns)
                if len(results) > 1:  # the run of the strongest tier tried: stable across re-runs
                    run_id = max(results, key=lambda r: strength(r[0]))[1]
                if merged is not None:
                    for name, a in merged.fields.items():
                        flat[f"{name}__decision"] = a.decision
                        flat[f"{name}__processor"] = a.processor
                        if a.decision == "human_corrected":
                            flat[f"{name}__confidence"] = "human"
                    if verdicts.get(row_key) or any(
                        a.decision in ("review", "rejected") for a in merged.fields.values()
                    ):
                        self.on_review(merged)
                status = output_status(state, self.budget_exhausted)
                climbing = state != "done" and bool(results)
                if climbing and state in ("failed", "timed_out", "action_required"):  # the stronger run ended badly
                    why = error or "no error detail from the API"
                    error = "kept the best answer so far; the stronger processor's " + (
                        why if why.startswith("run ") else f"run {state.replace('_', ' ')}: {why}"
                    )
                    status, state = "completed", "done"
                elif climbing:  # an answer was paid for; a stronger processor's run has not finished
                    error = "kept the best answer so far; the stronger processor's run is not finished" + (
                        f" ({self.pending_reason})"
                        if self.pending_reason
                        else " (budget)"
                        if status == "skipped_budget"
                        else ""
                    )
                    status, state = "completed", "done"
                self.statuses[status] += 1
                if state == "done":
                    for f in self.fields:
                        self.confidence[f][str(flat.get(f"{f}__confidence"))] += 1
                latency = self.stats.add(state, flat, result, submitted_at, finished_at)
                show_run = run_id if state in ("done", "failed", "timed_out", "action_required", "submitted") else None
                if state == "done" and not climbing:
                    error = None
                elif not climbing and status in ("pending", "unknown") and self.pending_reason and not error:
                    error = f"not finished: the job stopped ({self.pending_reason})"
                records.append((values, flat, status, error, show_run, latency))
            self.rows += len(records)
            yield records


def write_csv(proj: Projection, fp: Any, guard: bool) -> None:
    text = io.TextIOWrapper(fp, encoding="utf-8", newline="", write_through=False)
    w = csv.writer(text, lineterminator="\r\n")
    w.writerow(proj.header())
    names = [c[0] for c in proj.columns]

    def cell(v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return v  # numbers as the csv module writes them (never formula-guarded)
        text = encode_cell(v)
        return neutralize(text) if guard else text

    for records in proj.chunks():
        for values, flat, status, error, run_id, latency in records:
            w.writerow(
                [
                    *(cell(v) for v in values),
                    *(cell(flat[n]) for n in names),
                    status,
                    cell(error),
                    run_id or "",
                    "" if latency is None else latency,
                ]
            )
    text.flush()
    text.detach()


def arrow_schema(proj: Projection, metadata: dict[str, str] | None = None) -> Any:
    """The typed output schema: input columns keep their recorded types, output columns their JSON types."""
    schema_b64 = proj.journal.get("arrow_schema")
    in_types = {}
    if schema_b64:
        in_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schema_b64)))
        in_types = {f.name: f.type for f in in_schema}
    fields = [pa.field(c, in_types.get(c, pa.string())) for c in proj.input_columns]
    fields += [pa.field(c[0], _arrow_type(c[1], c[2])) for c in proj.columns]
    fields += [pa.field(c, pa.float64() if c == "_enrich_latency_s" else pa.string()) for c in META_COLUMNS]
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in (metadata or {}).items()})


def arrow_tables(proj: Projection, schema: Any) -> Any:
    """Yield one typed Arrow table per journal chunk, in input order."""
    n_in = len(proj.input_columns)
    names = [c[0] for c in proj.columns]
    for records in proj.chunks():
        cols: list[list[Any]] = [[] for _ in schema]
        for values, flat, status, error, run_id, latency in records:
            for i in range(n_in):
                cols[i].append(values[i])
            for j, n in enumerate(names):
                cols[n_in + j].append(flat[n])
            base = n_in + len(names)
            cols[base].append(status)
            cols[base + 1].append(error)
            cols[base + 2].append(run_id)
            cols[base + 3].append(latency)
        arrays = [
            from_json_values(col, f.type) if i < n_in else _array(col, f.type)
            for i, (col, f) in enumerate(zip(cols, schema, strict=True))
        ]
        yield pa.Table.from_arrays(arrays, schema=schema)
        del arrays, cols


def write_parquet(proj: Projection, fp: Any, metadata: dict[str, str]) -> None:

    schema = arrow_schema(proj, metadata)
    pool = pa.default_memory_pool()
    with pq.ParquetWriter(fp, schema, compression="zstd", memory_pool=pool) as writer:
        for table in arrow_tables(proj, schema):
            writer.write_table(table)
            del table
            pool.release_unused()  # hand Arrow's freed buffers back: memory stays flat on huge outputs


def collect_xlsx(proj: Projection) -> Any:
    """The whole output as a polars frame ready for Excel (an .xlsx is built in memory anyway)."""
    schema = arrow_schema(proj)
    tables = list(arrow_tables(proj, schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows >= EXCEL_MAX_ROWS:
        raise ConfigError(
            f"{table.num_rows:,} rows do not fit one Excel sheet ({EXCEL_MAX_ROWS - 1:,} at most); "
            "the journal keeps every result: `enrich export JOURNAL --output out.parquet`"
        )
    kinds = {c[0]: _xlsx_kind(c) for c in proj.columns}
    kinds["_enrich_error"] = "text"
    # xlsx cells are written as text cells (never formulas): the CSV formula guard has nothing to do here
    frame = to_frame(table, kinds)
    if (cut := longest_cell(frame, proj.input_columns)) is not None:  # preflight refuses this before a run pays
        name, row, chars = cut
        raise ConfigError(
            f"input column {name!r}, row {row:,} of the output, has {chars:,} characters; an .xlsx cell holds at "
            f"most {EXCEL_MAX_CELL_CHARS:,}: the journal keeps every result: "
            "`enrich export JOURNAL --output out.parquet` (or .csv)"
        )
    return frame


def _xlsx_kind(col: Column) -> str:
    """How to_frame shows an output column: citations, array, json_items (objects, one JSON text each), text."""
    if col[1] == "array":
        return "json_items" if main_type((col[2] or {}).get("items")) == "object" else "array"
    return "citations" if col[1] == "citations" else "text"


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The "Run summary" sheet: the report's numbers as (label, value); value None = a section title."""
    lat = report.get("latency_s") or {}
    rows: list[tuple[str, Any]] = [
        (
            "EMULATED: values come from the local emulator, not web research"
            if report.get("emulated")
            else "Live run against the Task API",
            "",
        ),
        ("Rows", report["rows"]),
        ("Rows by status", None),
        *((f"  {k}", v) for k, v in sorted(report["status_counts"].items())),
        ("Money (USD)", None),
        ("  spend", report["spend_usd"]),
        ("  budget", report.get("budget_usd")),
        ("  estimate (all rows at list price)", report.get("estimated_cost_usd")),
        *(
            [("  worst case (every rung of the ladder)", report["ladder_worst_case_usd"])]
            if "ladder_worst_case_usd" in report
            else []
        ),
        ("  cost per 1,000 completed rows (CPM)", report.get("cpm_usd")),
        *((f"  {p}: {d['runs']} runs", d["cost_usd"]) for p, d in (report.get("cost_by_processor") or {}).items()),
        ("Latency per finished run, created to recorded (s)", None),
        *((f"  {k}", lat.get(k)) for k in ("count", "mean", "p50", "p90", "p95", "p99", "max")),
        ("Answers", None),
        ("  rows with an answer", report.get("rows_with_answer")),
        ("  hit rate", report.get("hit_rate")),
        *((f"  fill rate: {f}", v) for f, v in (report.get("fill_rate") or {}).items()),
        ("Confidence", None),
        *((f"  {f}: {k}", v) for f, c in report["confidence_counts"].items() for k, v in sorted(c.items())),
        ("Top cited domains", None),
        *((f"  {d}", n) for d, n in report.get("top_cited_domains") or []),
    ]
    for col, counts in (report.get("decision_counts") or {}).items():
        rows += [(f"Decisions: {col}", None), *((f"  {k}", v) for k, v in sorted(counts.items()))]
    return rows


def _array(values: list[Any], typ: Any) -> Any:
    """Build a typed column; values that went through JSON (dates, decimals) are cast back.

    Objects inside an array column (an array of objects) become one JSON text per item."""
    if pa.types.is_list(typ) and pa.types.is_string(typ.value_type):
        values = [
            v if not isinstance(v, list) else [i if i is None or isinstance(i, str) else encode_cell(i) for i in v]
            for v in values
        ]
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string()).cast(typ)


def _default_decided(results: list[Any], names: list[str], gate: Any, key: tuple[str, ...]) -> Any:
    return merge([(p, json.loads(r) if isinstance(r, str) else r) for p, _rid, r in results], names, gate, key=key)


def write_output(
    journal: Journal,
    path: Path,
    fields: dict[str, dict[str, Any]],
    *,
    reasoning: bool,
    formula_guard: bool,
    emulated: bool,
    budget_exhausted: bool,
    extra: dict[str, Any],
    cfg: Any = None,
) -> dict[str, Any]:
    """Write the output file and `<output>.report.json`; return the report.

    When neither the journal nor the output settings changed since the last write and every file it
    wrote (output, reports, review file) is still the one written, the write is skipped (a no-op resume
    rewrites nothing); a file deleted, replaced or modified since (its size, mtime or inode changed) makes it
    write them all again.
    """
    started = time.monotonic()
    if sum(journal.counts().values()) >= TRIM_FROM_ROWS:
        _trim_heap()
    state_key = _state_key(journal, path, fields, reasoning, formula_guard, emulated, budget_exhausted)
    report_path = report_json_path(path)
    last = journal.get("last_output")
    ids = _written_ids(path, cfg is not None) if last and last.get("state") == state_key else None
    if ids is not None and last.get("files") == ids:
        report = json.loads(report_path.read_text())
        report.update(extra)
        report["output_unchanged"] = True
        return report
    if (problem := output_format_problem(path)) is not None:
        raise ConfigError(problem)
    proj = Projection(journal, fields, reasoning, budget_exhausted, cfg)
    proj.pending_reason = extra.get("stopped_because")
    try:
        return _write(journal, path, proj, report_path, state_key, formula_guard, emulated, extra, cfg, started)
    finally:
        proj.review.close()


def _write(
    journal: Journal,
    path: Path,
    proj: Projection,
    report_path: Path,
    state_key: str,
    formula_guard: bool,
    emulated: bool,
    extra: dict[str, Any],
    cfg: Any,
    started: float,
) -> dict[str, Any]:
    report: dict[str, Any] = {"output": str(path), "emulated": emulated}
    suffix = path.suffix.lower()
    frame = None
    if is_parquet(path):
        meta = {
            "enrich.emulated": "true" if emulated else "false",
            "enrich.journal": str(journal.path),
            "enrich.job_id": str(journal.get("job_id", "")),
        }
        atomic_write(path, lambda fp: write_parquet(proj, fp, meta))
    elif suffix == ".xlsx":
        frame = collect_xlsx(proj)  # written below: its summary sheet needs the report
    else:
        atomic_write(path, lambda fp: write_csv(proj, fp, formula_guard))
    spent = journal.spent_micros()
    report.update(
        {
            "rows": proj.rows,
            "status_counts": dict(proj.statuses),
            "spend_usd": round(spent / 1e6, 6),
            "confidence_counts": {f: dict(c) for f, c in proj.confidence.items()},
            **proj.stats.numbers(
                proj.rows,
                spent,
                proj.statuses.get("completed", 0),
                extra.get("budget_usd"),
                journal.paid_by_processor(),
                journal.run_latencies(),
            ),
            **extra,
        }
    )
    if frame is not None:
        coloured = [c[0] for c in proj.columns if c[4] == "confidence" or c[0] in proj.stats.decision_cols]
        citations = [c[0] for c in proj.columns if c[4] == "citations"]
        summary = _summary_rows(report)
        formats = journal.get("number_formats") or {}  # the .xlsx input's, per input column
        atomic_write(path, lambda fp: write_workbook(fp, frame, coloured, citations, summary, formats))
    if cfg is not None:
        report["review_file"] = str(review_path(path))
        report["review_lines"] = write_review_cells(
            review_path(path), proj.review.lines(), list(cfg.input.key), formula_guard=formula_guard
        )
        cal = calibration(cfg, journal.verdict_history(), report["confidence_counts"], report["rows"])
        if cal["reviewed"]:  # the user's own reviews say how often each level was right (enrich calibrate)
            report["calibration"] = cal
    report["report_files"] = [str(report_path), str(html_report_path(path))]
    report["write_s"] = round(time.monotonic() - started, 3)
    if proj.statuses.get("timed_out"):
        report["timed_out_note"] = (
            "timed-out runs cannot be cancelled (the API has no cancel endpoint); they may still finish and be billed"
        )
    if emulated:
        report["warning"] = "EMULATED: these values come from the local emulator's knowledge table, not web research"
    atomic_json(report_path, report, indent=2)
    html = render_html(report)  # milliseconds (charts are drawn directly), so an interrupted run draws it too
    atomic_write(html_report_path(path), lambda fp: fp.write(html.encode()))
    if not journal.readonly:
        journal.set("last_output", {"state": state_key, "files": _written_ids(path, cfg is not None)})
    return report


TRIM_FROM_ROWS = 50_000  # below this the pipeline's garbage is small, and a full collection costs ~0.1 s


def _trim_heap() -> None:
    """Give memory freed by the pipeline back to the OS before the write's own peak (glibc only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _written_ids(path: Path, review: bool) -> list[list[int]] | None:
    """(size, mtime, inode) of each file a write leaves (the review file when a job config is given), or
    None when one is missing: a file deleted or replaced since the last write makes the next one write."""
    files = [path, report_json_path(path), html_report_path(path), *([review_path(path)] if review else [])]
    try:
        return [[st.st_size, st.st_mtime_ns, st.st_ino] for st in (f.stat() for f in files)]
    except OSError:
        return None


def _state_key(journal: Journal, path: Path, fields: Any, *flags: Any) -> str:
    """Changes whenever any row changes state (every transition stamps a time or moves a count)."""
    return digest([str(path.resolve()), fields, flags, journal.write_state(), journal.counts(), journal.spent_micros()])
