"""Stage 4, write: project the journal into the output file and a JSON run report.

Every row of the current input appears exactly once, in input order, with all input
columns unchanged, then the output columns (flatten.py), then `_enrich_status`,
`_enrich_error`, `_enrich_run_id`. The file is written to a temp file in the same
directory (mode 0600), fsynced and renamed over the target, so a reader never sees half an
output. CSV output neutralises spreadsheet formulas; Parquet output is typed (list columns
stay lists) and carries the report in its key-value metadata. The output is a rebuildable
projection: `enrich export` rewrites it from the journal alone.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from enrich import failpoints
from enrich.errors import ConfigError
from enrich.flatten import Column, flatten, output_columns
from enrich.journal import Journal
from enrich.read import from_json_values
from enrich.spec import main_type

STATUS = {"done": "completed", "failed": "failed", "timed_out": "timed_out", "intent": "unknown",
          "unknown": "unknown", "submitted": "pending", "pending": "pending"}
META_COLUMNS = ("_enrich_status", "_enrich_error", "_enrich_run_id")
# Output file extension -> format: the one list of what `write_output` can produce (preflight checks it).
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
DURATION_SAMPLE = 20_000
WRITE_CHUNK = 2_000   # rows per read from the journal and per Parquet row group
_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\x00")


def neutralize(cell: str) -> str:
    """Prefix `'` to text a spreadsheet would run as a formula; numbers stay numbers.

    >>> neutralize("=HYPERLINK(1)"), neutralize("-2"), neutralize("@x"), neutralize("abc")
    ("'=HYPERLINK(1)", '-2', "'@x", 'abc')
    """
    if cell.startswith(_FORMULA_START) and not _NUMERIC.match(cell):
        return "'" + cell
    return cell


def output_status(state: str, budget_exhausted: bool) -> str:
    if state == "pending" and budget_exhausted:
        return "skipped_budget"
    return STATUS[state]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(fileobj)` on a 0600 temp file beside `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        failpoints.hit("mid_write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _arrow_type(kind: str, schema: dict[str, Any] | None) -> Any:
    import pyarrow as pa

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


class Projection:
    """Turns journal rows into output records and collects the report's statistics."""

    def __init__(self, journal: Journal, fields: dict[str, dict[str, Any]], reasoning: bool, budget_exhausted: bool):
        self.journal = journal
        self.fields, self.reasoning, self.budget_exhausted = fields, reasoning, budget_exhausted
        self.columns: list[Column] = output_columns(fields, reasoning)
        self.input_columns: list[str] = journal.get("columns", [])
        self.statuses: Counter[str] = Counter()
        self.confidence: dict[str, Counter[str]] = {f: Counter() for f in fields}
        self.durations: list[float] = []     # a bounded uniform sample: memory stays flat on huge inputs
        self.timed = 0
        self._rand = random.Random(0)
        self.rows = 0

    def _sample(self, value: float) -> None:
        """Reservoir sampling (exact up to DURATION_SAMPLE rows)."""
        self.timed += 1
        if len(self.durations) < DURATION_SAMPLE:
            self.durations.append(value)
        elif (j := self._rand.randrange(self.timed)) < DURATION_SAMPLE:
            self.durations[j] = value

    def header(self) -> list[str]:
        return [*self.input_columns, *(c[0] for c in self.columns), *META_COLUMNS]

    def chunks(self) -> Any:
        epoch = self.journal.get("epoch", 0)
        for chunk in self.journal.iter_rows(epoch, chunk=WRITE_CHUNK):
            records = []
            for row_json, state, run_id, result_json, error, submitted_at, finished_at in chunk:
                values = json.loads(row_json)
                result = json.loads(result_json) if result_json and state == "done" else None
                flat = flatten(result, self.fields, self.reasoning, self.columns)
                status = output_status(state, self.budget_exhausted)
                self.statuses[status] += 1
                if state == "done":
                    for f in self.fields:
                        self.confidence[f][str(flat.get(f"{f}__confidence"))] += 1
                    if submitted_at and finished_at:
                        self._sample(finished_at - submitted_at)
                show_run = run_id if state in ("done", "failed", "timed_out", "submitted") else None
                records.append((values, flat, status, error if state != "done" else None, show_run))
            self.rows += len(records)
            yield records


def write_csv(proj: Projection, fp: Any, guard: bool) -> None:
    import io

    text = io.TextIOWrapper(fp, encoding="utf-8", newline="", write_through=False)
    w = csv.writer(text, lineterminator="\n")
    w.writerow(proj.header())
    names = [c[0] for c in proj.columns]

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, list | dict):
            v = json.dumps(v, ensure_ascii=False)
        elif not isinstance(v, str):
            return v
        return neutralize(v) if guard else v

    for records in proj.chunks():
        for values, flat, status, error, run_id in records:
            w.writerow([*(cell(v) for v in values), *(cell(flat[n]) for n in names), status, cell(error),
                        run_id or ""])
    text.flush()
    text.detach()


def write_parquet(proj: Projection, fp: Any, metadata: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema_b64 = proj.journal.get("arrow_schema")
    in_types = {}
    if schema_b64:
        in_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schema_b64)))
        in_types = {f.name: f.type for f in in_schema}
    fields = [pa.field(c, in_types.get(c, pa.string())) for c in proj.input_columns]
    fields += [pa.field(c[0], _arrow_type(c[1], c[2])) for c in proj.columns]
    fields += [pa.field(c, pa.string()) for c in META_COLUMNS]
    schema = pa.schema(fields, metadata={k.encode(): v.encode() for k, v in metadata.items()})
    n_in = len(proj.input_columns)
    names = [c[0] for c in proj.columns]
    pool = pa.default_memory_pool()
    with pq.ParquetWriter(fp, schema, compression="zstd", memory_pool=pool) as writer:
        for records in proj.chunks():
            cols: list[list[Any]] = [[] for _ in fields]
            for values, flat, status, error, run_id in records:
                for i in range(n_in):
                    cols[i].append(values[i])
                for j, n in enumerate(names):
                    cols[n_in + j].append(flat[n])
                base = n_in + len(names)
                cols[base].append(status)
                cols[base + 1].append(error)
                cols[base + 2].append(run_id)
            arrays = [from_json_values(col, f.type) if i < n_in else _array(col, f.type)
                      for i, (col, f) in enumerate(zip(cols, fields, strict=True))]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            del arrays, cols
            pool.release_unused()   # hand Arrow's freed buffers back: memory stays flat on huge outputs


def _array(values: list[Any], typ: Any) -> Any:
    """Build a typed column; values that went through JSON (dates, decimals) are cast back."""
    import pyarrow as pa

    try:
        return pa.array(values, type=typ)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string()).cast(typ)


def write_output(journal: Journal, path: Path, fields: dict[str, dict[str, Any]], *, reasoning: bool,
                 formula_guard: bool, emulated: bool, budget_exhausted: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the output file and `<output>.report.json`; return the report.

    When neither the journal nor the output settings changed since the last write and the
    file is still the one written, the write is skipped (a no-op resume rewrites nothing).
    """
    started = time.monotonic()
    _trim_heap()
    state_key = _state_key(journal, path, fields, reasoning, formula_guard, emulated, budget_exhausted)
    report_path = path.with_name(path.name + ".report.json")
    last = journal.get("last_output")
    if (last and last.get("state") == state_key and path.exists() and report_path.exists()
            and last.get("file") == _file_id(path)):
        report = json.loads(report_path.read_text())
        report.update(extra)
        report["output_unchanged"] = True
        return report
    proj = Projection(journal, fields, reasoning, budget_exhausted)
    report: dict[str, Any] = {"output": str(path), "emulated": emulated}
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"output {path}: unsupported extension {path.suffix!r}; use one of "
                          f"{', '.join(sorted(OUTPUT_FORMATS))}")
    if fmt == "parquet":
        meta = {"enrich.emulated": "true" if emulated else "false",
                "enrich.journal": str(journal.path), "enrich.job_id": str(journal.get("job_id", ""))}
        atomic_write(path, lambda fp: write_parquet(proj, fp, meta))
    else:
        atomic_write(path, lambda fp: write_csv(proj, fp, formula_guard))
    spent = journal.spent_micros()
    durations = sorted(proj.durations)
    report.update({
        "rows": proj.rows,
        "status_counts": dict(proj.statuses),
        "spend_usd": round(spent / 1e6, 6),
        "confidence_counts": {f: dict(c) for f, c in proj.confidence.items()},
        "run_duration_s": {
            "p50": round(statistics.median(durations), 3) if durations else None,
            "p95": round(durations[int(0.95 * (len(durations) - 1))], 3) if durations else None,
            "max": round(durations[-1], 3) if durations else None,
        },
        "write_s": round(time.monotonic() - started, 3),
        **extra,
    })
    if proj.statuses.get("timed_out"):
        report["timed_out_note"] = ("timed-out runs cannot be cancelled (the API has no cancel endpoint); "
                                    "they may still finish and be billed")
    if emulated:
        report["warning"] = "EMULATED: these values come from the local emulator's knowledge table, not web research"
    atomic_write(report_path, lambda fp: fp.write(json.dumps(report, indent=2, sort_keys=True).encode()))
    if not journal.readonly:
        journal.set("last_output", {"state": state_key, "file": _file_id(path)})
    return report


def _trim_heap() -> None:
    """Give memory freed by the pipeline back to the OS before the write's own peak (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _file_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _state_key(journal: Journal, path: Path, fields: Any, *flags: Any) -> str:
    """Changes whenever any row changes state (every transition stamps a time or moves a count)."""
    from enrich.config import digest

    row = journal.conn.execute("SELECT COUNT(*), MAX(intent_at), MAX(submitted_at), MAX(finished_at), SUM(attempts) "
                               "FROM rows WHERE epoch=?", (journal.get("epoch", 0),)).fetchone()
    return digest([str(path.resolve()), fields, flags, journal.get("epoch", 0), list(row), journal.counts(),
                   journal.spent_micros()])
