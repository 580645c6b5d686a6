"""Partition outputs into the job's output: one file in input order, or a Parquet dataset.

One file: the partition files are concatenated in partition order (which is input order),
streamed (a CSV is copied after its header, a Parquet file one row group at a time), into a
temp file renamed over the output: a reader never sees half a merge and memory stays flat.

A directory: each finished partition's Parquet file is copied in as `part-NNNNN.parquet`
(atomically), then `_manifest.json` is rewritten (atomically) to list it: the manifest is
always written last, so every file it names is complete.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from enrich.errors import ConfigError
from enrich.files import PARQUET_SUFFIXES, atomic_write

MANIFEST = "_manifest.json"
PARQUET = PARQUET_SUFFIXES


def is_dataset(path: Path) -> bool:
    """Is `[output] path` a directory (existing, or named with a trailing slash / no file suffix)?"""
    return path.is_dir() or str(path).endswith("/") or path.suffix == ""


def merge_files(parts: list[Path], out: Path) -> None:
    """Concatenate partition outputs (all CSV or all Parquet, as `out`) into `out`, atomically."""
    if out.suffix.lower() in PARQUET:
        atomic_write(out, lambda fp: _merge_parquet(parts, fp))
    else:
        atomic_write(out, lambda fp: _merge_csv(parts, fp))


def _merge_csv(parts: list[Path], fp: Any) -> None:
    header: list[str] | None = None
    for path in parts:
        with path.open("r", newline="", encoding="utf-8") as f:
            head = next(csv.reader(iter(f.readline, "")))  # reads exactly the header record's lines
            if header is None:
                header = head
                text = io.StringIO()
                csv.writer(text, lineterminator="\r\n").writerow(head)
                fp.write(text.getvalue().encode())
            elif head != header:
                raise ConfigError(f"{path}: columns differ from the first partition's output; cannot merge")
            while chunk := f.read(1 << 20):
                fp.write(chunk.encode())


def _merge_parquet(parts: list[Path], fp: Any) -> None:
    writer = None
    schema = None
    try:
        for path in parts:
            pf = pq.ParquetFile(path)
            if writer is None:
                schema = pf.schema_arrow
                writer = pq.ParquetWriter(fp, schema, compression="zstd")
            assert schema is not None
            for i in range(pf.num_row_groups):
                table = pf.read_row_group(i)
                if not table.schema.equals(schema, check_metadata=False):
                    table = table.cast(schema)
                writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def copy_into_dataset(src: Path, outdir: Path, name: str) -> Path:
    """Copy a partition's Parquet output into the dataset directory as `name`, atomically."""
    if src.suffix.lower() not in PARQUET:
        raise ConfigError(f"{outdir}: a directory output is a Parquet dataset; partition output {src} is not Parquet")
    dst = outdir / name

    def copy(fp: Any) -> None:
        with src.open("rb") as f:
            shutil.copyfileobj(f, fp, 1 << 20)

    atomic_write(dst, copy)
    return dst


def write_manifest(outdir: Path, entries: list[dict[str, Any]], total_parts: int, extra: dict[str, Any]) -> None:
    """`_manifest.json`: the finished partitions' files, rows and statuses; `complete` when all are in."""
    entries = sorted(entries, key=lambda e: e["partition"])
    data = {
        "format": "parquet",
        "partitions": total_parts,
        "files": entries,
        "rows": sum(e["rows"] for e in entries),
        "complete": len(entries) == total_parts,
        "written_at": time.time(),
        **extra,
    }
    atomic_write(outdir / MANIFEST, lambda fp: fp.write(json.dumps(data, indent=1, sort_keys=True).encode()))


def read_manifest(outdir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((outdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
