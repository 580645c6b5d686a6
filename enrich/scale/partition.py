"""Cut the input into deterministic partitions, once: slice files and a plan under `<journal>.parts/`.

A partition is a contiguous range of rows of one input file (CSV or Parquet); an input that is
a directory or a glob gives one partition per file, or more for big files. The slices are
written once, each atomically, and `job.json` (the plan) last: a later run finds the plan and
uses the very same slices, so a row always belongs to the same partition journal and is never
researched twice by two partitions. When the input changed since it was cut, the job is
refused (rows would move between journals and be paid for again) until `--fresh`.

The whole input is validated here, before anything is sent: the header, every cell (the
single-machine reader's rules), keys that are empty or repeated across files.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from enrich.config import RunConfig, canonical
from enrich.errors import ConfigError, InputError
from enrich.files import PARQUET_SUFFIXES, atomic_json, atomic_write
from enrich.read import key_problem, open_table
from enrich.scale import PARTS_SUFFIX

ROWS_PER_PARTITION = 50_000
PLAN_FILE = "job.json"
PARQUET = PARQUET_SUFFIXES


@dataclass
class Partition:
    """One slice: `index`, its file `slice` (relative to the parts dir), `rows`, the `source` file
    it was cut from, its first row's position there (`start`, 0-based) and the slice's sha256."""

    index: int
    slice: str
    rows: int
    source: str
    start: int
    digest: str

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass
class PartitionPlan:
    """The plan of a partitioned job, as stored in `<journal>.parts/job.json`."""

    parts_dir: Path
    fmt: str  # "csv" | "parquet": the slices' format
    columns: list[str]
    sources: list[dict[str, Any]]  # [{"path", "sha256", "rows"}] in input order
    partitions: list[Partition] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    def journal(self, p: Partition) -> Path:
        return self.parts_dir / f"{p.name}.sqlite"

    def slice_path(self, p: Partition) -> Path:
        return self.parts_dir / p.slice

    def marker(self, p: Partition) -> Path:
        """Written when a partition finished (its exit code, rows, what it was run with)."""
        return self.parts_dir / f"{p.name}.done.json"

    def save(self) -> None:
        data = {
            "version": 1,
            "format": self.fmt,
            "columns": self.columns,
            "sources": self.sources,
            "partitions": [asdict(p) for p in self.partitions],
        }
        atomic_json(self.parts_dir / PLAN_FILE, data)


def parts_dir_for(journal: Path) -> Path:
    """`<journal>.parts/`: the partition journals, slices, outputs and markers of a partitioned job."""
    return journal.with_name(journal.name + PARTS_SUFFIX)


def load_plan(parts_dir: Path) -> PartitionPlan | None:
    """The stored plan, or None when the job was never cut (or the cut did not finish)."""
    path = parts_dir / PLAN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        parts = [Partition(**p) for p in data["partitions"]]
        return PartitionPlan(parts_dir, data["format"], data["columns"], data["sources"], parts)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: unreadable partition plan ({exc}); run with --fresh to cut the input again"
        ) from None


def resolve_inputs(path: Path) -> list[Path]:
    """The input files, in order: the file itself, a directory's CSV/Parquet files, or a glob's matches
    (sorted by name). All must be of one format (CSV or Parquet)."""
    text = str(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (*PARQUET, ".csv")
        )
    elif any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
    else:
        files = [path]
    if not files:
        raise InputError(text, "no CSV or Parquet files found")
    kinds = {f.suffix.lower() in PARQUET for f in files}
    if len(kinds) > 1:
        raise InputError(text, "mixes CSV and Parquet files; use one format")
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _count_and_check(cfg: RunConfig, files: list[Path]) -> tuple[list[str], list[int]]:
    """Validate every file with the single-machine reader's rules; return the header and row counts.
    Keys must be usable and unique across all files (each partition's journal sees only its own)."""
    header: list[str] | None = None
    counts: list[int] = []
    seen: dict[str, tuple[str, int]] = {}
    wanted = list(dict.fromkeys([*cfg.input.key, *cfg.input.input_columns]))
    for f in files:
        info, batches = open_table(f, wanted, set(), cfg.input.encoding, cfg.input.max_cell_bytes)
        if header is None:
            header = info.columns
        elif info.columns != header:
            batches.close()  # type: ignore[attr-defined]
            raise InputError(str(f), f"columns {info.columns} differ from the first file's {header}", line=1)
        kidx = [info.columns.index(c) for c in cfg.input.key]
        n = 0
        try:
            for batch in batches:
                for row in batch:
                    vals = [row.values[i] for i in kidx]
                    if (problem := key_problem(vals)) is not None:
                        raise InputError(str(f), f"{problem} in key column(s) {cfg.input.key}", line=row.line)
                    key = canonical(vals)
                    if key in seen:
                        where = seen[key]
                        raise InputError(
                            str(f),
                            f"duplicate key {key} in column(s) {cfg.input.key} (first in "
                            f"{where[0]} at line {where[1]}); keys must be unique",
                            line=row.line,
                        )
                    seen[key] = (f.name, row.line)
                    n += 1
        finally:
            batches.close()  # type: ignore[attr-defined]
        counts.append(n)
    assert header is not None
    return header, counts


def _pieces(counts: list[int], partitions: int | None) -> list[int]:
    """How many partitions each file is cut into: `partitions` in all (apportioned by rows, at least one
    per file, at most one per row), else one per ROWS_PER_PARTITION rows."""
    if not partitions:
        return [max(1, math.ceil(n / ROWS_PER_PARTITION)) for n in counts]
    total = sum(counts)
    want = min(max(partitions, len(counts)), total)
    quota = [n * want / total for n in counts]
    pieces = [max(1, min(n, math.floor(q))) for n, q in zip(counts, quota, strict=True)]
    while sum(pieces) < want:  # largest remainder first
        i = max((i for i in range(len(counts)) if pieces[i] < counts[i]), key=lambda i: quota[i] - pieces[i])
        pieces[i] += 1
    while sum(pieces) > want:
        i = min((i for i in range(len(counts)) if pieces[i] > 1), key=lambda i: quota[i] - pieces[i])
        pieces[i] -= 1
    return pieces


def _sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def cut(cfg: RunConfig, parts_dir: Path, partitions: int | None) -> PartitionPlan:
    """The job's partitions: the stored plan when the input is unchanged, else a new cut.

    Raises InputError for bad input and ConfigError when the input changed under an existing plan."""
    files = resolve_inputs(cfg.input.path)
    shas = [_sha256(f) for f in files]
    plan = load_plan(parts_dir)
    if plan is not None:
        if [s["sha256"] for s in plan.sources] != shas:
            raise ConfigError(
                f"{cfg.input.path}: the input changed since this job was partitioned ({parts_dir}); "
                "rows would move between partition journals and be paid for again. Restore the "
                "input, use another --journal, or pass --fresh to start over"
            )
        return plan
    header, counts = _count_and_check(cfg, files)
    pieces = _pieces(counts, partitions)
    fmt = "parquet" if files[0].suffix.lower() in PARQUET else "csv"
    parts_dir.mkdir(parents=True, exist_ok=True)
    (parts_dir / "slices").mkdir(exist_ok=True)
    plan = PartitionPlan(
        parts_dir,
        fmt,
        header,
        [{"path": str(f.resolve()), "sha256": s, "rows": n} for f, s, n in zip(files, shas, counts, strict=True)],
    )
    for f, n, k in zip(files, counts, pieces, strict=True):
        sizes = _sizes(n, k)
        first = len(plan.partitions)
        names = [f"slices/part-{first + i:05d}.{'parquet' if fmt == 'parquet' else 'csv'}" for i in range(k)]
        if fmt == "parquet":
            _slice_parquet(f, [parts_dir / s for s in names], sizes)
        else:
            _slice_csv(cfg, f, [parts_dir / s for s in names], sizes, header)
        start = 0
        for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
            plan.partitions.append(Partition(first + i, name, size, str(f.resolve()), start, _sha256(parts_dir / name)))
            start += size
    plan.save()  # last: a plan on disk means every slice it names is complete
    return plan


def _slice_csv(cfg: RunConfig, src: Path, outs: list[Path], sizes: list[int], header: list[str]) -> None:
    """Rows of `src` into consecutive UTF-8 CSV slices (cells exactly as read), each written atomically."""
    _info, batches = open_table(src, list(cfg.input.key), set(), cfg.input.encoding, cfg.input.max_cell_bytes)
    rows = (row.values for batch in batches for row in batch)
    try:
        for out, size in zip(outs, sizes, strict=True):

            def write(fp: Any, size: int = size) -> None:
                text = io.TextIOWrapper(fp, encoding="utf-8", newline="")
                w = csv.writer(text, lineterminator="\n")
                w.writerow(header)
                for _ in range(size):
                    w.writerow(next(rows))
                text.flush()
                text.detach()

            atomic_write(out, write)
    finally:
        batches.close()  # type: ignore[attr-defined]


def _slice_parquet(src: Path, outs: list[Path], sizes: list[int]) -> None:
    """Rows of `src` into consecutive Parquet slices with the source's schema, each written atomically."""
    pf = pq.ParquetFile(src)
    batches = pf.iter_batches(batch_size=10_000)
    pending = None
    for out, size in zip(outs, sizes, strict=True):

        def write(fp: Any, size: int = size) -> None:
            nonlocal pending
            with pq.ParquetWriter(fp, pf.schema_arrow, compression="zstd") as writer:
                left = size
                while left > 0:
                    if pending is None or pending.num_rows == 0:
                        pending = next(batches)
                    take = pending.slice(0, left)
                    writer.write_batch(take)
                    left -= take.num_rows
                    pending = pending.slice(take.num_rows)

        atomic_write(out, write)
