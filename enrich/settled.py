"""A finished job's re-run, answered from its journal without loading the pipeline.

When a run ends with every row done and nothing left to climb (exit 0), `record` notes in the journal
everything that answer depends on: the job's fingerprint (its config after every flag, its journal, the
API key's digest, emulator or not), the input's fingerprint (path, size, mtime and sha256 of its bytes,
how it is read, the task: `input_fingerprint`, the same one seeding uses), the journal's write state, the
files that run left (size, mtime, inode) and, with --emulator, its knowledge table's (the full run checks
it). `answer` re-derives each one for the same command; when all are equal, running the job again would
seed nothing, submit nothing and rewrite nothing, so it answers with the lines that run would print and
exit 0. Anything different, missing or unreadable answers None and the full run decides: this never
refuses, pays, writes or changes the journal.

Imports nothing heavy (no polars, pyarrow or httpx): `enrich run` of a finished job takes a fraction of
a second (README, Performance).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

from enrich.config import RunConfig, build_task_spec, digest, spec_fingerprint
from enrich.files import XLSX_SUFFIXES, html_report_path, report_json_path, review_path
from enrich.journal import Journal
from enrich.report import read_report, result_summary, run_lines


def input_fingerprint(cfg: RunConfig, spec_hash: str) -> str | None:
    """Identity of (input file bytes, how it is read, the task): equal means seeding would change nothing."""
    try:
        st = cfg.input.path.stat()
        if not stat.S_ISREG(st.st_mode):  # a pipe would be consumed here (or block), not fingerprinted
            return None
        h = hashlib.sha256()
        with cfg.input.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return digest(
        [
            str(cfg.input.path.resolve()),
            st.st_size,
            st.st_mtime_ns,
            h.hexdigest(),
            cfg.input.key,
            cfg.input.input_columns,
            cfg.input.encoding,
            cfg.input.max_cell_bytes,
            cfg.input.dedupe,
            cfg.input.where,
            spec_hash,
            cfg.ladder,
            *([cfg.input.sheet] if cfg.input.sheet is not None else []),
            # an .xlsx output checks every row while seeding (preflight.SheetFit): a switch to it re-reads
            *(["xlsx"] if cfg.output.path.suffix.lower() in XLSX_SUFFIXES else []),
        ]
    )


def job_fingerprint(cfg: RunConfig, journal_path: Path, api_key: str, emulated: bool) -> str:
    """The job as this command names it: every setting after flags, where its journal is, whose key."""
    return digest(
        [
            cfg.model_dump(mode="json"),
            str(cfg.source),
            os.path.realpath(journal_path),
            digest(["enrich-key", api_key], 16),
            emulated,
        ]
    )


def _files(cfg: RunConfig) -> dict[str, list[int]]:
    out = cfg.output.path
    ids = {}
    for path in (out, report_json_path(out), html_report_path(out), review_path(out)):
        try:
            st = path.stat()
        except OSError:
            continue
        ids[str(path)] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return ids


def _knowledge(cfg: RunConfig, emulated: bool) -> list[int] | None:
    """The embedded emulator's knowledge table as the full run would find it: that run checks it before
    anything else (preflight.check_knowledge) and refuses one deleted or changed into one it cannot use."""
    if not emulated or cfg.emulator.knowledge is None:
        return None
    try:
        st = Path(cfg.emulator.knowledge).stat()
    except OSError:
        return [-1]
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _state(cfg: RunConfig, journal: Journal, journal_path: Path, api_key: str, emulated: bool) -> dict[str, Any]:
    return {
        "job": job_fingerprint(cfg, journal_path, api_key, emulated),
        "input": input_fingerprint(cfg, spec_fingerprint(cfg, build_task_spec(cfg))),
        "journal": journal.write_state(),
        "files": _files(cfg),
        "knowledge": _knowledge(cfg, emulated),
    }


def record(cfg: RunConfig, journal: Journal, journal_path: Path, api_key: str, emulated: bool) -> None:
    """After a run that left nothing to do (exit 0, every row done) and wrote its files: note what it
    depended on. A job that refreshes old answers (`refresh_after_days`) is never settled: time alone
    changes what its next run does."""
    if cfg.task.refresh_after_days is not None:
        return
    state = _state(cfg, journal, journal_path, api_key, emulated)
    if state["input"] is not None:
        journal.set("settled", state)


def clear(journal: Journal) -> None:
    """A run has started on this journal: whatever it does, the last settled answer no longer holds."""
    if journal.get("settled") is not None:
        journal.set("settled", None)


def answer(cfg: RunConfig, api_key: str, emulated: bool) -> list[str] | None:
    """The lines `enrich run` would print for this finished job, if nothing it depends on changed since
    its last run settled it; else None (run it). Never raises for a journal or file it cannot read."""
    started = time.monotonic()
    path = cfg.journal_path
    if cfg.journal is None and not path.exists():  # an old default name, or no journal yet: the run resolves it
        return None
    try:
        journal = Journal.open(path, readonly=True)
    except Exception:  # no journal, not one, or locked: the full run says which
        return None
    try:
        was = journal.get("settled")
        if not was or journal.get("live"):
            return None
        if _state(cfg, journal, path, api_key, emulated) != was:
            return None
        report_file = report_json_path(cfg.output.path)
        report = read_report(report_file)
        if report is None:
            return None
        shown_emulated = emulated or bool(journal.get("emulated")) or bool(journal.get("emulator_seen"))
    except Exception:  # a journal being rewritten under us: let the full run look
        return None
    finally:
        journal.close()
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    message = result_summary(report, cfg.output.path, shown_emulated, cfg.emulator.knowledge_key)
    return run_lines(message, report)
