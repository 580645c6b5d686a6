"""The job and its use cases: run, export, review apply, plan and status all open the same job.

A job is resolved once: its config after every flag (`RunConfig`), its journal, its task spec
(built once) and output fields (`Job`). `run_job` resolves it, checks everything knowable before
the first paid request (preflight: paths, key, journal identity, a journal that lost its rows),
records the job in its journal (`record_job`), runs the stages against the API (or the embedded
emulator), writes the output and says how the job ended as an exit code with one line of
explanation. It never calls `sys.exit` and raises only the error tree's exceptions (errors.py).

Every other entry point opens the job the journal recorded (`open_job`, `recorded_job`): from a
config and the same flags as `run`, or from the journal alone. `export`, `status` and
`review apply` therefore project exactly what the run that wrote the journal projected: its gate,
ladder, verdicts, output settings and paths. The CLI, the notebook API and each Ray partition are
thin callers of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import csv
import itertools
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from enrich import failpoints, pilot, pilot_page, preflight, settled
from enrich.audit import basis_rows, write_basis
from enrich.calibrate import calibration
from enrich.client import TaskClient
from enrich.config import (
    DEFAULT_BASE_URL,
    RunConfig,
    build_task_spec,
    canonical,
    check_max_processor,
    config_from_mapping,
    digest,
    load_config,
    output_fields,
    spec_fingerprint,
)
from enrich.decide import decided, escalate_pass
from enrich.errors import (
    DISK_ERRNOS,
    EXIT_AUTH,
    EXIT_BUDGET,
    EXIT_CODES,
    EXIT_DISK,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ApiUnavailable,
    AuthError,
    ConfigError,
    EnrichError,
    InputError,
    JournalError,
    OutputError,
    PaymentRequired,
    StorageError,
    advice,
    disk_message,
    redact,
)
from enrich.files import (
    PARQUET_SUFFIXES,
    atomic_json,
    atomic_write,
    encode_cell,
    pilot_html_path,
    pilot_json_path,
    remove_stale_temps,
    report_json_path,
)
from enrich.gate import Verdict, answer_of, decide_row, output_of
from enrich.journal import IN_FLIGHT, ROW_STATES, Journal
from enrich.pipeline import Prepared, execute, format_plan, plan_summary, prepare  # noqa: F401 (Prepared: a type)
from enrich.processors import PROCESSORS, tier
from enrich.progress import JobState, Stop
from enrich.report import read_report, result_summary
from enrich.reuse import ResultCache, Reuse, open_cache
from enrich.reuse import summary as reuse_summary
from enrich.review import read_review
from enrich.scale import status as scale_status
from enrich.spend import iso_z, next_reset, utc_day
from enrich.storage import Storage, mode_of, resolve
from enrich.write import WRITE_CHUNK, Projection, write_output

__all__ = [
    "EXIT_AUTH",
    "EXIT_BUDGET",
    "EXIT_CODES",
    "EXIT_DISK",
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Job",
    "JobResult",
    "apply_review",
    "export",
    "open_job",
    "record_verdicts",
    "run_job",
]

# What a projection of the journal depends on besides the rows: these settings of the recorded
# job win over a config given to export/review/status (only `enrich run` changes them).
PROJECTION_SETTINGS = ("gate", "escalate", "output.reasoning", "output.formula_guard", "task")


@dataclass
class Job:
    """One job: the config after every flag, its journal file and the mode it is kept in (`storage`: local WAL
    or the network mode, storage.py; None for a job recorded before modes were), its task spec and output
    fields."""

    cfg: RunConfig
    journal_path: Path
    storage: Storage | None = None

    @property
    def task_spec(self) -> dict[str, Any]:
        return build_task_spec(self.cfg)

    @property
    def fields(self) -> dict[str, dict[str, Any]]:
        return output_fields(self.task_spec)

    @property
    def output(self) -> Path:
        return self.cfg.output.path


def job_for(cfg: RunConfig) -> Job:
    """The job a config (after flags) names: its journal and the journal's mode are resolved once, here."""
    path = journal_path_for(cfg)
    return Job(cfg, path, resolve(cfg.limits.journal_mode, path))


def _portable(job: Job) -> dict[str, Any]:
    """The job's config as recorded: every path absolute, the journal named, the spec beside it."""
    data = job.cfg.model_dump(mode="json", exclude={"source"})
    for section, key in (
        ("input", "path"),
        ("output", "path"),
        ("task", "output_schema"),
        ("limits", "spend_ledger"),
        ("emulator", "knowledge"),
    ):
        value = (data.get(section) or {}).get(key)
        if value:
            data[section][key] = str(Path(value).resolve())
    data["journal"] = str(job.journal_path.resolve())
    return data


def record_job(job: Job, journal: Journal) -> None:
    """Record the resolved job in its journal: every later command projects with these settings."""
    journal.set(
        "job",
        {
            "config": _portable(job),
            "task_spec": job.task_spec,
            "source": str(job.cfg.source or ""),
            "storage": job.storage.as_dict() if job.storage else None,
        },
    )


def recorded_job(journal: Journal, path: Path) -> Job | None:
    """The job its last run recorded in `journal`, or None for a journal from before jobs were recorded."""
    data = journal.get("job")
    if not isinstance(data, dict):
        return None
    try:
        cfg = config_from_mapping(data["config"], None, data.get("source") or str(path), task_spec=data["task_spec"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise JournalError(f"{path}: the job recorded in this journal cannot be read ({exc})") from None
    return Job(cfg, path, _recorded_storage(data.get("storage")))


def _recorded_storage(data: Any) -> Storage | None:
    if not isinstance(data, dict):
        return None
    mode, fs, why = data.get("journal_mode"), data.get("file_system"), data.get("why")
    if mode not in ("local", "network") or not isinstance(fs, str) or not isinstance(why, str):
        return None
    return Storage(mode, fs, why)


def _setting(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def differences(given: RunConfig, recorded: RunConfig) -> list[str]:
    """The projection settings in which a config differs from the job its journal recorded."""
    out = [s for s in PROJECTION_SETTINGS if s != "task" and _setting(given, s) != _setting(recorded, s)]
    if spec_fingerprint(given, build_task_spec(given)) != spec_fingerprint(recorded, build_task_spec(recorded)):
        out.append("task")
    return out


def _refuse_partitioned(jpath: Path) -> None:
    """A `--ray` job has no journal of its own, only its partitions': say so, and what to give instead (its
    journal path is otherwise "no such journal", as if the job had never run)."""
    if not jpath.is_file() and (cut := scale_status.partition_plan(jpath)) is not None:
        raise JournalError(
            f"{jpath}: a --ray job keeps one journal per partition; give one of them, e.g. "
            f"{cut.journal(cut.partitions[0]) if cut.partitions else cut.parts_dir} "
            "(`enrich run ... --ray` again merges their outputs)"
        )


def open_job(
    target: str | Path,
    overrides: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    *,
    readonly: bool = False,
    config: str | Path | None = None,
) -> tuple[Job, Journal, list[str]]:
    """Open an existing job for export/review/status: `target` is its config (with the same flags as
    `run`: --output, --journal, ...) or its journal file. Returns (job, open journal, notes).

    The job is the one the journal recorded; a config that differs from it in a projection setting
    yields a note (the recorded settings are used: only `enrich run` changes them). Raises
    JournalError when there is no journal, ConfigError for a bad config. `readonly` opens the journal
    beside a live run (status, export); `config` is the job's config given beside its journal (`export
    JOURNAL --config C`): noted when it differs, and the only source for a journal from an older enrich."""
    path = Path(target)
    given: Job | None = None
    if path.suffix.lower() == ".toml":
        given = job_for(load_config(path, dict(overrides or {}), flags=flags))
        jpath = given.journal_path
        _refuse_partitioned(jpath)
        if not jpath.is_file():
            raise JournalError(f"{jpath}: no journal for this job (output {given.output}); run it first")
    else:
        jpath = path
        _refuse_partitioned(jpath)
        if config is not None:  # a journal and its config: the config is checked against the recorded job
            given = Job(load_config(config, dict(overrides or {}), flags=flags), jpath)
            path = Path(config)
    preflight.check_journal_file(jpath)
    journal = Journal.open(jpath, readonly=readonly)
    try:
        job = recorded_job(journal, jpath)
    except BaseException:
        journal.close()
        raise
    notes: list[str] = []
    if job is None:  # a journal from before jobs were recorded: the config given (if any) is all we know
        if given is None:
            journal.close()
            raise JournalError(
                f"{jpath}: this journal does not record its job (written by an older enrich); "
                "give the job's config instead: enrich export CONFIG [--output ... as for run]"
            )
        return given, journal, notes
    if given is not None and (diff := differences(given.cfg, job.cfg)):
        # the run command that applies them is the one this job ran with: its flags, and --emulator for an
        # emulated job (without it, `run` asks for a key, and with one refuses the emulated journal)
        again = ["enrich", "run", str(path)]
        for setting, value in (overrides or {}).items():
            if value is not None and flags and setting in flags:
                again += [flags[setting], str(value)]
        if journal.get("emulated"):
            again.append("--emulator")
        notes.append(
            f"note: {path} differs from the job recorded in {jpath} ({', '.join(diff)}); using the job as "
            f"last run. `{shlex.join(again)}` applies the new settings"
        )
    return job, journal, notes


@dataclass
class JobResult:
    """How a job ended: `exit_code` (EXIT_CODES), `message` (one line), the run report and row counts."""

    exit_code: int
    message: str
    report: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    output: Path | None = None
    journal: Path | None = None
    deferred: bool = False  # a partition stopped to leave the job's budget to others' first tier (scale/runner.py)
    error: EnrichError | None = None  # what ended the job before its natural end (auth, payment, no API, a bug)


def base_url_for(cfg: RunConfig) -> str:
    return cfg.api.base_url or os.environ.get("PARALLEL_BASE_URL") or DEFAULT_BASE_URL


def journal_path_for(cfg: RunConfig) -> Path:
    """The configured journal, else `<output>.journal.sqlite`; a journal under the old default name
    (`<output stem>.journal.sqlite`, shared by outputs that differ only in extension) is used only
    when it belongs to this very output."""
    path = cfg.journal_path
    if cfg.journal or path.exists():
        return path
    out = cfg.output.path
    legacy = out.with_name(out.name.split(".")[0] + ".journal.sqlite")
    if legacy.exists():
        with contextlib.suppress(JournalError):
            view = Journal.open(legacy, readonly=True)
            try:
                recorded = (view.get("config") or {}).get("output")
            finally:
                view.close()
            if recorded and Path(recorded).resolve() == out.resolve():
                return legacy
    return path


def output_has_run_ids(path: Path) -> bool:
    """Does an existing output hold completed results with run ids (so a journal existed for it)?"""
    if not path.is_file():
        return False
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            schema = pq.read_schema(path)
            if "_enrich_run_id" not in schema.names:
                return False
            col = pq.read_table(path, columns=["_enrich_run_id"]).column(0)
            return col.null_count < len(col) and any(v for v in col.to_pylist())
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.reader(f)
                header = next(reader, [])
                if "_enrich_run_id" not in header:
                    return False
                i = header.index("_enrich_run_id")
                return any(len(r) > i and r[i] for r in reader)
    except Exception:  # an unreadable output says nothing about a journal; the writer replaces it
        return False
    return False


def _identity(cfg: RunConfig, task_spec: dict[str, Any], api_key: str) -> dict[str, Any]:
    return {
        "output": str(cfg.output.path.resolve()),
        "task_spec": spec_fingerprint(cfg, task_spec),
        "key_columns": list(cfg.input.key),
        "api_key": digest(["enrich-key", api_key], 16),
    }


def _open_paying(
    cfg: RunConfig, job: Job, api_key: str, emulated: bool, fresh: bool
) -> tuple[Journal, ResultCache | None, dict[str, Any]]:
    """What every command that may pay (`run`, `pilot`) does first, before anything is sent: the preflight checks,
    the job's identity, its results cache (a corrupt or foreign one is refused here), its journal opened in the
    job's storage mode (removed first with `fresh`), and the settled answer cleared, since the journal changes."""
    jpath, storage = job.journal_path, job.storage
    assert storage is not None
    preflight.check_job(cfg, api_key=api_key, emulated=emulated, journal_path=jpath)
    identity = _identity(cfg, build_task_spec(cfg), api_key)
    cache = open_cache(cfg.cache.path, mode=cfg.limits.journal_mode)
    if fresh:  # -journal too: a rollback journal a killed run left would be played into the new journal
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{jpath}{suffix}").unlink(missing_ok=True)
    try:
        journal = Journal.open(jpath, mode=storage.mode)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    settled.clear(journal)  # from here on, this command decides what the journal holds
    return journal, cache, identity


def _admit(cfg: RunConfig, journal: Journal, identity: dict[str, Any], emulated: bool, adopt: bool) -> None:
    """May this command pay into this journal: its results are of the same origin (emulated or real), it is this
    job's journal (identity; `adopt` takes over one whose output moved), and the spend ledger is attached."""
    mode = journal.get("emulated")
    if mode is not None and mode != emulated and journal.get("taskgroup_id"):
        # another --journal alone is not enough on the command line: the output still holds the other origin's
        # researched rows, and a new journal beside them is refused so as not to pay for them again
        raise JournalError(
            f"{journal.path}: this journal holds {'emulated' if mode else 'real'} results; "
            f"use another {advice('--output (and --journal, if you gave one)', 'journal=')} "
            f"for {'emulated' if emulated else 'real'} runs"
        )
    journal.check_identity(identity, adopt)
    if cfg.limits.daily_budget_usd is not None or cfg.limits.spend_ledger is not None:
        journal.attach_ledger(cfg.limits.spend_ledger, str(journal.path))


def run_job(
    cfg: RunConfig,
    *,
    api_key: str,
    emulated: bool = False,
    retry_failed: bool = False,
    adopt: bool = False,
    fresh: bool = False,
    stop: Stop | None = None,
    install_signals: bool = True,
    transport: Any = None,
    governor: Any = None,
    detach: bool = False,
    cache_reads: bool | None = None,
) -> JobResult:
    """Run (or resume) one job to its end and write its output. See the module docstring.

    With a shared results cache (`[cache] path`), completed results are written to it and read from it before
    rows are claimed; `cache_reads=False` (default: not with `fresh`) writes but never reads it.

    `transport` is the client's seam (an httpx transport) for tests that play server behaviours;
    `governor` (submit.Governor) enforces limits shared with other partitions of the same job;
    `detach` submits everything and returns without waiting for results (collect with a later run).

    Stopping: with `install_signals`, on the main thread, SIGINT/SIGTERM/SIGHUP stop the job from the moment
    the journal opens until the output is written (a second one leaves at once). Otherwise the job's event loop runs on a worker thread while the calling thread waits, so a
    KeyboardInterrupt there (Ctrl-C in a script, a Jupyter kernel interrupt, `ray.cancel`) stops the job
    (progress.Stop) instead of being held until it ends; the result then has EXIT_INTERRUPTED. `stop` lets
    another thread stop it too."""
    cpu0 = time.process_time()
    if detach and emulated:
        raise ConfigError(
            "--detach needs a server that outlives this process; with --emulator, start "
            "`enrich emulator` separately and pass --base-url (any PARALLEL_API_KEY, e.g. 'local')"
        )
    job = job_for(cfg)
    jpath, storage = job.journal_path, job.storage
    assert storage is not None
    journal, cache, identity = _open_paying(cfg, job, api_key, emulated, fresh)
    remove_stale_temps(cfg.output.path)
    server = None
    stop = stop or Stop()
    # the CLI: this thread's signal handlers own Ctrl-C; anyone else: the loop runs on a worker thread
    here = install_signals and threading.current_thread() is threading.main_thread() and not _loop_running()
    held = contextlib.ExitStack()
    try:
        if here:
            held.enter_context(_signals(stop))
        if journal.is_empty() and not fresh and output_has_run_ids(cfg.output.path):
            raise JournalError(
                f"{jpath}: journal is missing or empty, but {cfg.output.path} holds researched rows "
                "with run ids; running now would pay for them again. Restore the journal, or "
                + advice("pass --fresh to start over", "pass fresh=True to start over")
            )
        _admit(cfg, journal, identity, emulated, adopt)
        prep = prepare(cfg, journal, retry_failed=retry_failed)
        refresh = cfg.task.refresh_after_days
        reuse = Reuse(
            journal,
            cache,
            fresh_after=time.time() - refresh * 86400 if refresh else None,
            # dedupe = false asks for a run per row (independent samples): nothing is served from the cache
            read=((not fresh) if cache_reads is None else cache_reads) and cfg.input.dedupe,
            emulated=emulated,
        )
        journal.set("emulated", emulated)
        journal.set(
            "config",
            {
                "path": str(cfg.source),
                "output": str(cfg.output.path),
                "reasoning": cfg.output.reasoning,
                "formula_guard": cfg.output.formula_guard,
                "task_spec": prep.task_spec,
            },
        )
        record_job(job, journal)  # export, review, status project with exactly these settings
        if emulated:
            server = _start_emulator(cfg)
            base_url = server.base_url
        else:
            base_url = base_url_for(cfg)
        state, interrupted = _execute(
            cfg,
            journal,
            prep,
            base_url,
            api_key,
            emulated,
            stop,
            here,
            transport,
            governor,
            detach,
            reuse,
        )
        if server is not None:  # the API's part is over: the embedded emulator winds down while the output is written
            server.request_stop()
        result = _finish(cfg, journal, jpath, prep, state, interrupted, emulated, api_key, cpu0, storage)
        if detach and result.exit_code in (EXIT_OK, EXIT_FAILED_ROWS) and not journal.unresolved():
            n = journal.in_flight_count()
            result.exit_code = EXIT_OK
            result.message = (
                f"detached: {n} runs are at the API ({state.submitted} sent now); collect the results "
                "later with the same command without --detach"
            )
        return result
    finally:
        if server is not None:
            server.stop()
        journal.close()
        held.close()
        if cache is not None:
            cache.close()


def _start_emulator(cfg: RunConfig) -> Any:
    from enrich.emulator import EmulatorConfig, EmulatorServer

    e = cfg.emulator
    return EmulatorServer(
        EmulatorConfig(
            knowledge=str(e.knowledge) if e.knowledge else None,
            knowledge_key=e.knowledge_key,
            time_scale=e.time_scale,
            seed=e.seed,
            fail_rate=e.fail_rate,
            rate_limit=e.rate_limit,
            faults=e.faults,
            behaviours=e.behaviours,
            hard_rate=e.hard_rate,
        )
    ).start()


def _execute(
    cfg: RunConfig,
    journal: Any,
    prep: Any,
    base_url: str,
    api_key: str,
    emulated: bool,
    stop: Stop,
    here: bool,
    transport: Any,
    governor: Any,
    detach: bool = False,
    reuse: Reuse | None = None,
) -> tuple[Any, bool]:
    state = JobState(stop=stop)

    async def on_response(response: Any) -> None:
        if response.request.method == "POST" and response.request.url.path.endswith("/runs"):
            failpoints.hit("after_send_before_response")

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        stop.bind(loop, asyncio.current_task())
        client = TaskClient(
            base_url, api_key, timeout_s=cfg.limits.request_timeout_s, on_response=on_response, transport=transport
        )
        try:
            return await execute(
                cfg,
                journal,
                client,
                prep,
                emulated=emulated,
                state=state,
                governor=governor,
                detach=detach,
                reuse=reuse,
            )
        finally:
            await client.aclose()
            if client.emulator_seen and not emulated:
                journal.set("emulator_seen", True)  # reached an emulator through --base-url: mark the output

    if here:  # _signals holds SIGINT, so asyncio.run leaves it to those handlers
        asyncio.run(main())
    else:
        _run_on_worker(main(), stop)
    return state, stop.interrupted


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal went away


@contextlib.contextmanager
def _signals(stop: Stop) -> Iterator[None]:
    """The CLI's signals, held for the whole job (before its event loop starts, while it runs, and while the
    output is written): before the loop starts (preflight, seeding the input, nothing sent yet) a signal
    leaves at once as KeyboardInterrupt; after, the first stops the job (Stop.interrupt; the output is still
    written), a second one leaves at once. Process-level handlers, not the loop's: a loop resets SIGINT when it closes, and
    asyncio.run installs its own only where SIGINT has the default handler. A SIGHUP the process was started
    ignoring (nohup) stays ignored. The previous handlers return afterwards (an in-process caller
    keeps its own)."""

    def on_signal(signum: int, frame: Any) -> None:
        if not stop.started:  # still checking or seeding the input (one transaction, rolled back): leave at once
            raise KeyboardInterrupt
        with contextlib.suppress(OSError, ValueError):  # a closed stderr must not turn a stop into a crash
            if stop.interrupted:  # every commit already made is durable: the next run resumes from it
                print("enrich: interrupted again; exiting at once (the journal is intact)", file=sys.stderr)
            else:
                print("enrich: stopping (Ctrl-C again to leave at once)...", file=sys.stderr)
        if stop.interrupted:
            os._exit(EXIT_INTERRUPTED)
        stop.interrupt()

    previous = {}
    for sig in SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:  # nohup: outlive the terminal
            continue
        with contextlib.suppress(OSError, ValueError):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_on_worker(coro: Any, stop: Stop) -> Any:
    """Run `coro` to its end on a worker thread (its own event loop, this thread's context variables) while
    this thread waits in short slices: a KeyboardInterrupt raised here is delivered at once and becomes
    `stop.interrupt()`, and this thread leaves only when the job has (so the journal is never closed under
    it). Works inside a running event loop too (Jupyter). A job cancelled by a repeated interrupt raises
    KeyboardInterrupt here."""
    done = threading.Event()
    box: dict[str, Any] = {}
    context = contextvars.copy_context()

    def target() -> None:
        try:
            box["result"] = context.run(asyncio.run, coro)
        except BaseException as exc:  # re-raised in the waiting thread
            box["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=target, name="enrich-job", daemon=True)
    worker.start()
    asked = pending = 0
    while not done.is_set():
        try:
            while asked < pending:
                asked += 1
                stop.interrupt()
            done.wait(0.1)
        except KeyboardInterrupt:
            pending += 1
    worker.join()
    if "error" in box:
        if isinstance(box["error"], asyncio.CancelledError) and stop.interrupts > 1:
            raise KeyboardInterrupt from None
        raise box["error"]
    return box["result"]


def _finish(
    cfg: RunConfig,
    journal: Any,
    jpath: Path,
    prep: Any,
    state: Any,
    interrupted: bool,
    emulated: bool,
    api_key: str,
    cpu0: float,
    storage: Storage,
) -> JobResult:
    if isinstance(state.fatal, StorageError):  # the journal cannot record any more: nothing to write from
        raise state.fatal
    emulated_flag = emulated  # as the command said it (the job's identity); the output shows either
    emulated = emulated or bool(journal.get("emulated")) or bool(journal.get("emulator_seen"))
    counts = journal.counts(prep.epoch)
    stop = stop_reason(state, interrupted, counts, api_key)
    why = stop.why
    try:
        report = write_output(
            journal,
            cfg.output.path,
            prep.fields,
            reasoning=cfg.output.reasoning,
            formula_guard=cfg.output.formula_guard,
            emulated=emulated,
            budget_exhausted=state.budget_exhausted,
            cfg=cfg,
            extra={
                "processor": cfg.task.processor,
                "journal": str(jpath),
                "journal_mode": storage.mode,
                "journal_storage": storage.as_dict(),
                "budget_usd": cfg.limits.budget_usd,
                "interrupted": interrupted,
                "runs_created_this_invocation": state.submitted,
                "rows_escalated_this_invocation": state.escalated,
                "ladder": cfg.ladder,
                "http_requests_this_invocation": state.requests,
                "stopped_because": why,
                "reuse": reuse_summary(journal, prep.epoch, cfg.ladder),
                "elapsed_s": round(time.monotonic() - state.started, 3),
                "cpu_s": round(time.process_time() - cpu0, 3),
            },
        )
    except OSError as exc:
        safe = f"every result is safe in {jpath}: " + advice(
            f"free space or fix the folder, then run the same command again (or enrich export {jpath} --output FILE)",
            "free space or fix the folder, then call enrich_frame again",
        )
        raise write_error(cfg.output.path, exc, safe) from None
    if why:
        journal.log("error", why)
    journal.set("live", None)
    sc = report["status_counts"]
    summary = result_summary(report, cfg.output.path, emulated, cfg.emulator.knowledge_key)
    result = JobResult(EXIT_OK, summary, report, counts, cfg.output.path, jpath, deferred=state.budget_deferred)
    result.exit_code, result.error = stop.exit_code, stop.error
    if stop.kind == "interrupted":
        result.message = f"{summary}\ninterrupted; progress is saved in {jpath}"
    elif stop.kind == "budget":
        result.message = f"{summary}\n{state.budget_message or 'budget exhausted'}: {_skipped(cfg, journal, prep, sc)}"
    elif stop.kind in ("auth", "fatal", "crashed", "unavailable"):
        result.message = f"{summary}\nstopped: {stop.why}"
    elif stop.kind == "failed_rows" and stop.why:
        result.message = f"{summary}\n{stop.why}"
    elif stop.kind == "done" and not stop.why and not journal.readonly:
        settled.record(cfg, journal, jpath, api_key, emulated_flag)  # a re-run can answer without the pipeline
    return result


def _skipped(cfg: RunConfig, journal: Any, prep: Any, status_counts: dict[str, int]) -> str:
    """What the budget left undone, in two counts that match the output: rows never researched (their
    status is skipped_budget) and escalation steps not run (those rows show their best answer so far)."""
    pending = Counter(journal.pending_by_processor(prep.epoch))
    if len(cfg.ladder) > 1:  # rows that finished a step and would climb the next: plan counts them too
        escalate_pass(journal, cfg, prep.epoch, list(prep.fields), dry=True, targets=pending)
    return left_undone(cfg, dict(pending), status_counts)


def left_undone(cfg: RunConfig, pending: dict[str, int], status_counts: dict[str, int]) -> str:
    """The budget stop's counts from pending rows per processor and the output's status counts."""
    rows = status_counts.get("skipped_budget", 0)
    steps = sum(n for p, n in pending.items() if p in cfg.ladder[1:])
    again = sum(pending.values()) - rows - steps  # e.g. a refresh that is due: the earlier answer is shown
    said = [f"{rows} rows not researched (skipped_budget)"] if rows else []
    if steps:
        said.append(f"{steps} escalation steps not run (their rows keep the best answer so far)")
    if again > 0:
        said.append(f"{again} rows not researched again (they keep their earlier answer)")
    return "; ".join(said) + "; raise the budget (or wait for the daily reset) and run again"


def _as_error(exc: BaseException, why: str) -> EnrichError:
    """The error that stopped the job, as one of the error tree's (a stage that crashed becomes an EnrichError)."""
    if isinstance(exc, EnrichError):
        return exc
    err = EnrichError(f"the job stopped: {why}")
    err.__cause__ = exc
    return err


StopKind = Literal["done", "auth", "fatal", "crashed", "interrupted", "unavailable", "budget", "failed_rows"]


@dataclass(frozen=True)
class StopReason:
    """How a job ended, decided in one place: its kind, exit code, the one line saying why rows may still be
    pending (None when nothing stopped it early), and the error to raise for callers that raise."""

    kind: StopKind
    exit_code: int
    why: str | None = None
    error: EnrichError | None = None


def stop_reason(state: Any, interrupted: bool, counts: Mapping[str, int], api_key: str) -> StopReason:
    """The one owner of a job's end state, in this order: an error that stopped it (auth/payment: 5; one of
    the error tree's: its own code; anything else is a bug: 70), an interrupt (75), an API that could not
    be reached (69), the budget (4), rows not completed (3), else done (0)."""
    if (fatal := state.fatal) is not None:
        why = redact(str(fatal), api_key) or type(fatal).__name__
        if isinstance(fatal, AuthError | PaymentRequired):
            return StopReason("auth", EXIT_AUTH, why, fatal)
        if isinstance(fatal, EnrichError):
            return StopReason("fatal", fatal.exit_code, why, fatal)
        return StopReason(
            "crashed", EXIT_SOFTWARE, f"internal error ({why}); the journal is intact", _as_error(fatal, why)
        )
    if interrupted:
        return StopReason("interrupted", EXIT_INTERRUPTED, "interrupted")
    if state.unreachable:
        why = redact(state.unreachable, api_key)
        error = ApiUnavailable(
            f"stopped: {why}; results so far are kept: "
            + advice("run the same command again", "call enrich_frame again to resume")
        )
        return StopReason("unavailable", EXIT_UNAVAILABLE, why, error)
    if counts.get("pending", 0) and state.budget_exhausted:
        return StopReason("budget", EXIT_BUDGET, state.budget_message or "budget exhausted")
    notes = (
        ["the task group could not be listed; rows in doubt are reported as unknown"] if state.reconcile_failed else []
    )
    if held := counts.get("action_required", 0):
        notes.append(
            f"{held:,} row{'s' if held != 1 else ''} wait for an action at the API (action_required); "
            + advice("run the same command again", "call enrich_frame again")
            + " after acting: their runs are asked again, not paid again"
        )
    note = "; ".join(notes) or None
    if any(
        counts.get(s, 0)
        for s in ("failed", "timed_out", "unknown", "intent", "pending", "submitted", "action_required")
    ):
        return StopReason("failed_rows", EXIT_FAILED_ROWS, note)
    return StopReason("done", EXIT_OK, note)


# ---- use cases on an existing job ------------------------------------------------------------------


def _emulated(journal: Journal) -> bool:
    return bool(journal.get("emulated") or journal.get("emulator_seen"))


def rewrite_output(job: Job, journal: Journal, extra: dict[str, Any], safe: str = "") -> dict[str, Any]:
    """Project the journal into the job's own output, review and report files (as `run` writes them)."""
    cfg = job.cfg
    try:
        return write_output(
            journal,
            cfg.output.path,
            job.fields,
            reasoning=cfg.output.reasoning,
            formula_guard=cfg.output.formula_guard,
            emulated=_emulated(journal),
            budget_exhausted=False,
            extra=extra,
            cfg=cfg,
        )
    except OSError as exc:
        raise write_error(cfg.output.path, exc, safe or f"the journal {job.journal_path} is intact") from None


def export(job: Job, journal: Journal, output: Path | None, basis: Path | None) -> dict[str, int]:
    """`enrich export`: project the job into another file (`output`) and/or its evidence (`basis`).

    The projection is the job's own (gate, ladder, verdicts, output settings), so an export shows
    exactly what the run wrote. Returns {"rows": n, "basis_lines": m} for what was written."""
    cfg = job.cfg
    inp = str(cfg.input.path.resolve())
    for flag, target in (("--output", output), ("--basis", basis)):
        if target is None:
            continue
        if flag == "--output":
            preflight.check_output_path(target, input_path=inp, journal_path=str(job.journal_path), flag=flag)
        t = target.resolve()
        if t == job.journal_path.resolve() or t == Path(inp):
            raise ConfigError(f"{flag}: {target} is the journal or the input file; choose another path")
    done: dict[str, int] = {}
    if output is not None:
        try:
            report = write_output(
                journal,
                output,
                job.fields,
                reasoning=cfg.output.reasoning,
                formula_guard=cfg.output.formula_guard,
                emulated=_emulated(journal),
                budget_exhausted=False,
                extra={"exported_from": str(job.journal_path)},
                cfg=cfg,
            )
        except OSError as exc:
            raise write_error(output, exc, "no file was half-written, and the journal is unchanged") from None
        done["rows"] = report["rows"]
    if basis is not None:
        try:
            done["basis_lines"] = export_basis(
                journal, basis, job.fields, cfg, list(cfg.input.key), cfg.output.formula_guard
            )
        except OSError as exc:
            raise write_error(basis, exc, "no file was half-written, and the journal is unchanged") from None
    return done


def write_error(path: Path, exc: OSError, safe: str) -> OutputError | StorageError:
    """The one-line error for a file that could not be written: a full or failing disk is a StorageError
    (exit 74, resumable), anything else an OutputError; `safe` says what is intact."""
    if exc.errno in DISK_ERRNOS:
        return StorageError(disk_message(path, exc.strerror or str(exc), safe))
    return OutputError(f"cannot write {path}: {exc.strerror or exc}; {safe}")


def export_basis(
    journal: Journal,
    path: Path,
    fields: dict[str, dict[str, Any]],
    cfg: RunConfig,
    key_columns: list[str],
    formula_guard: bool = True,
) -> int:
    """The audit export: one line per (row key, field, citation) with value, confidence, decision,
    processor, run id, reasoning, url, title and excerpts (audit.py), streamed from the journal."""
    proj = Projection(journal, fields, False, False, cfg)
    proj.review.close()  # the audit export writes no review file
    epoch = journal.get("epoch", 0)

    def lines() -> Any:
        for chunk in journal.iter_results(epoch, proj.ladder, chunk=WRITE_CHUNK):
            verdicts = journal.verdicts_for([r[0] for r in chunk if r[2] == "done"])
            for row_key, _row_json, state, run_id, _e, _s, _f, input_hash, results in chunk:
                if state != "done" or not results:
                    continue
                _, merged = proj._decide(row_key, results, verdicts.get(row_key), input_hash, run_id)
                key_vals = dict(zip(key_columns, json.loads(row_key), strict=False))
                yield from basis_rows(key_vals, merged, gate_cfg=proj.gate)

    return write_basis(path, lines(), key_columns, formula_guard=formula_guard)


def known_keys(journal: Journal) -> dict[tuple[str, ...], str]:
    """The job's row keys as a review line names them (key values as text) -> the journal's row key."""
    return {tuple(str(v) for v in json.loads(k)): k for k in journal.row_keys(journal.get("epoch", 0))}


def apply_review(job: Job, journal: Journal, reviewed: Path) -> tuple[int, dict[str, Any]]:
    """`enrich review apply`: validate a filled-in review file against this job (all or nothing),
    append its verdicts with who, when and the value/confidence/processor reviewed, and rewrite the
    job's own output and review file. Returns (verdicts applied, report).

    Refused (InputError, nothing applied) when the file names runs that are not this job's (it came
    from another job), or a line says accept beside an edited value (that is a correction)."""
    keys = known_keys(journal)
    verdicts = read_review(reviewed, list(job.cfg.input.key), job.fields, keys)
    n = record_verdicts(job, journal, verdicts, str(reviewed), keys)
    safe = (
        f"the verdicts are recorded in {job.journal_path}; `enrich export {job.journal_path} --output "
        f"{job.output}` rewrites the output"
    )
    report = rewrite_output(job, journal, {"review_applied": str(reviewed)}, safe)
    return n, report


def record_verdicts(
    job: Job,
    journal: Journal,
    verdicts: list[Verdict],
    source: str,
    keys: Mapping[tuple[str, ...], str] | None = None,
) -> int:
    """Append verdicts (checked by `review.check_verdicts`) to the journal with who, when and the
    value/confidence/processor reviewed: the one writer of verdicts, for `review apply` and the review
    page. All or nothing: InputError(source, line, problem) when a verdict names a run that is not one
    of its row's in this job, or accepts beside an edited value. Returns how many were recorded."""
    cfg, fields = job.cfg, job.fields
    epoch = journal.get("epoch", 0)
    keys = known_keys(journal) if keys is None else keys
    wanted = {keys[v.key] for v in verdicts}
    rows: dict[str, tuple[list[Any], str, list[Any] | None]] = {}
    skipped = set()
    for chunk in journal.iter_results(epoch, cfg.ladder, chunk=WRITE_CHUNK, keys=list(wanted)):
        stored = journal.verdicts_for([r[0] for r in chunk])
        for row_key, _rj, state, _rid, _e, _s, _f, input_hash, results in chunk:
            rows[row_key] = (results, input_hash, stored.get(row_key))
            if state == "skipped":
                skipped.add(row_key)
    problems: list[tuple[int | None, str]] = []
    records = []
    for v in verdicts:
        if keys[v.key] in skipped:  # its output row shows no value: a verdict there would judge nothing shown
            problems.append(
                (v.line, f"row {', '.join(v.key)} is skipped by [input] where (not researched): nothing to review")
            )
            continue
        results, input_hash, marks = rows.get(keys[v.key], ([], "", None))
        runs = {rid: (proc, res) for proc, rid, res in results}
        if v.run_id and v.run_id not in runs:
            problems.append(
                (
                    v.line,
                    f"run {v.run_id} is not a run of this row in {job.journal_path}: this review file belongs to "
                    "another job; apply it with that job's config and the flags it ran with (--output/--journal), "
                    "or its journal",
                )
            )
            continue
        merged = decided(results, list(fields), cfg, v.key, marks, input_hash)
        now = merged.fields.get(v.field)
        shown = now.value if now is not None else None
        if v.run_id and (ran := runs.get(v.run_id)) is not None:
            parsed = json.loads(ran[1]) if isinstance(ran[1], str) else ran[1]
            shown = answer_of(parsed, v.field, ran[0], cfg.gate).value
        if v.verdict == "accept" and v.value is not None and v.value != encode_cell(shown):
            problems.append(
                (
                    v.line,
                    f"the value of {v.field!r} was edited but the verdict is accept; use correct and put the "
                    "new value in corrected_value (or restore the value)",
                )
            )
            continue
        previous = None
        if now is not None:
            previous = canonical(
                {
                    "value": now.value,
                    "confidence": now.confidence,
                    "processor": now.processor,
                    "decision": now.decision,
                    "run_id": now.run_id,
                }
            )
        corrected = None if v.corrected_value is None else canonical(v.corrected_value)
        records.append((keys[v.key], v.field, v.verdict, corrected, v.reviewer, v.note, v.run_id, previous))
    if problems:
        line, reason = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(source, reason + more, line=line)
    journal.add_verdicts(records, time.time())
    return len(records)


def calibrate_job(
    target: str | Path, overrides: Mapping[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """`enrich calibrate`: the job's calibration from its reviews (calibrate.py), read-only; (calibration,
    notes). The confidence counts it weighs the gate with are those of the job's own run report."""
    job, journal, notes = open_job(target, overrides, flags, readonly=True)
    try:
        report = read_report(report_json_path(job.output)) or {}
        cal = calibration(
            job.cfg, journal.verdict_history(), report.get("confidence_counts") or {}, report.get("rows", 0)
        )
    finally:
        journal.close()
    return cal, notes


def job_status(
    target: str | Path, overrides: Mapping[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`enrich status`: counts by state, spend, last error and what a live run is doing (read-only). Rows a pilot
    held out (Journal.hold_out) are counted under `held_out`, not under the `skipped` state."""
    path = Path(target)
    if path.suffix.lower() == ".toml":
        path = job_for(load_config(path, dict(overrides or {}), flags=flags)).journal_path
    preflight.check_journal_file(path)
    journal = Journal.open(path, readonly=True)
    try:
        epoch = journal.get("epoch", 0)
        counts = journal.counts(epoch)
        if held := journal.held_out(epoch):  # skipped by a pilot, not by `[input] where`: the next run researches them
            counts["skipped"] = counts.get("skipped", 0) - held
            if not counts["skipped"]:
                del counts["skipped"]
        live = live_run(journal)
        job = journal.get("job") or {}
        return {
            "journal": str(path),
            "journal_mode": mode_of(journal.sqlite_mode()),  # as the file is, whatever was recorded
            "journal_storage": job.get("storage"),
            "output": ((job.get("config") or {}).get("output") or {}).get("path"),
            "rows": sum(counts.values()) + held,
            "counts": counts,
            "held_out": held,
            "in_flight": sum(counts.get(s, 0) for s in IN_FLIGHT),
            "spent_usd": journal.spent_micros() / 1e6,
            "taskgroup_id": journal.get("taskgroup_id"),
            "emulated": _emulated(journal),
            "last_error": journal.last_error(),
            "recreated": journal.get("recreated"),
            "live": live,
        }
    finally:
        journal.close()


def live_run(journal: Journal) -> dict[str, Any] | None:
    """What the `enrich run` working on this journal last said it was doing (its heartbeat, at most 15 s old,
    from a process still alive), or None when no run is live."""
    live = journal.get("live")
    if isinstance(live, dict) and time.time() - live.get("at", 0) < 15 and _alive(live.get("pid")):
        return live
    return None


def format_status(info: dict[str, Any]) -> str:
    """The text `enrich status` prints."""
    counts = info["counts"]
    lines = [f"journal      {info['journal']}{'  [EMULATED]' if info['emulated'] else ''}"]
    lines.append(f"journal mode {mode_line(info.get('journal_mode'), info.get('journal_storage'))}")
    if info.get("output"):
        lines.append(f"output       {info['output']}")
    lines.append(f"rows         {info['rows']:,}")
    for state_name in ROW_STATES:
        if counts.get(state_name):
            lines.append(f"  {state_name:<10} {counts[state_name]:,}")
    if held := info.get("held_out"):
        lines.append(f"  {'held out':<10} {held:,}  (rows held out by a pilot; the next run researches them)")
    lines.append(f"in flight    {info['in_flight']:,}  (rows sent, results not yet recorded)")
    lines.append(f"spent        ${info['spent_usd']:,.4f}")
    lines.append(f"last error   {info['last_error'] or '-'}")
    if (again := info.get("recreated")) and again.get("runs"):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(again["at"]))
        lines.append(f"re-created   {again['runs']:,} runs on {when} (${again['usd']:,.4f}): {again['note']}")
    live = info.get("live")
    if live:
        lines.append(
            f"live         pid {live['pid']}: {min(live['active_runs'], live['cap']):,} runs active at the API "
            f"(cap {live['cap']:,}); waiting on: {live['waiting_on'] or 'results'}"
        )
    else:
        lines.append("live         no enrich process is running this job")
    return "\n".join(lines)


def mode_line(mode: Any, storage: Any) -> str:
    """`network (rollback journal, no WAL; nfs4, detected)`: the mode a journal is in and why it was chosen."""
    kind = {"network": "rollback journal, no WAL", "local": "WAL"}.get(str(mode), str(mode))
    if isinstance(storage, dict) and storage.get("journal_mode") == mode:
        return f"{mode} ({kind}; {storage.get('file_system')}, {storage.get('why')})"
    return f"{mode} ({kind})"


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def plan_job(cfg: RunConfig, *, emulated: bool = False, retry_failed: bool = False) -> str:
    """`enrich plan` / `run --dry-run`: what `run` would do with this config and these flags (no API call)."""
    path = journal_path_for(cfg)
    preflight.check_job(cfg, api_key=None, emulated=emulated, journal_path=path)
    if (info := scale_status.plan(cfg, path)) is not None:  # a partitioned job (--ray)
        return scale_status.format_plan(info)
    # plan makes no file: a cache not made yet holds nothing
    cache = open_cache(cfg.cache.path, create=False, mode=cfg.limits.journal_mode)
    try:
        journal = Journal.open(path, readonly=False) if path.exists() else Journal.open(":memory:")
        try:
            refresh = cfg.task.refresh_after_days
            # a job that has not reached its server yet is assumed to talk to the real API (it counts only its hits)
            reuse = Reuse(
                journal,
                cache,
                fresh_after=time.time() - refresh * 86400 if refresh else None,
                read=cfg.input.dedupe,
                emulated=emulated,
                assume="api",
            )
            prep = prepare(cfg, journal, retry_failed=retry_failed, dry=True, reuse=reuse)
            text = format_plan(plan_summary(cfg, prep, journal))
            return text + (f"\n{line}" if (line := pilot_estimate(cfg)) else "")
        finally:
            journal.close()
    finally:
        if cache is not None:
            cache.close()


# ---- the pilot (issue 16): a sample researched on each processor, in the job's own journal ------------------

DEFAULT_PILOT_PROCESSORS = ("lite", "base", "core")


@dataclass
class PilotResult:
    """How a pilot ended: `exit_code`, one line `message` when it stopped early, its findings (`data`, as written
    to `<output stem>.pilot.json`) and the files written."""

    exit_code: int
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    json_path: Path | None = None
    html_path: Path | None = None


class _PassStop(Stop):
    """The pilot's stop across its passes (one event loop each): a signal interrupts the pass running now, and a
    pass not started yet is not started."""

    def __init__(self) -> None:
        super().__init__()
        self.current: Stop | None = None

    @property
    def started(self) -> bool:
        return self.current is not None and self.current.started

    def interrupt(self) -> int:
        n = super().interrupt()
        if self.current is not None:
            self.current.interrupt()
        return n


def pilot_processors(cfg: RunConfig, names: list[str] | None) -> list[str]:
    """The pilot's processors, weakest first: known, each on a higher price tier than the one before, none above
    `[limits] max_processor`. ConfigError (exit 2) otherwise, also for an empty list. Without `names` (no
    --processors): the job's own, its ladder in order (`[task] processor`, then `[escalate] processors`), when the
    config sets a processor or a ladder; else DEFAULT_PILOT_PROCESSORS up to `max_processor`."""
    own = "processor" in cfg.task.model_fields_set or cfg.escalate is not None
    if names is not None and not names:
        raise ConfigError("--processors: name at least one processor (e.g. lite,base,core)")
    explicit = names is not None
    names = list(names) if names is not None else list(cfg.ladder if own else DEFAULT_PILOT_PROCESSORS)
    for p in names:
        if p not in PROCESSORS:
            raise ConfigError(f"--processors: unknown processor {p!r}; choose from {', '.join(PROCESSORS)}")
    for a, b in itertools.pairwise(names):
        if tier(b) <= tier(a):
            raise ConfigError(f"--processors: each must be on a higher price tier than the one before ({a}, {b})")
    cap = cfg.limits.max_processor
    if cap is not None and (above := [p for p in names if tier(p) > tier(cap)]):
        if explicit:
            raise ConfigError(f"--processors: {above[0]!r} is above [limits] max_processor = {cap!r}")
        if not own:  # the default list stops at the cap
            names = [p for p in names if tier(p) <= tier(cap)]
    for p in names:
        check_max_processor(_pass_config(cfg, p))
    return names


def _pass_config(cfg: RunConfig, processor: str) -> RunConfig:
    """The job on one processor, without a ladder: one pilot pass (the task spec and its fingerprint are the
    job's, so results land under the same (input, spec, processor) keys the full run looks up)."""
    out = cfg.model_copy(deep=True)
    out.task.processor = processor
    out.escalate = None
    return out


def pilot_sample(candidates: list[tuple[str, str, str]], rows: int, seed: int) -> list[tuple[str, str, str]]:
    """The seeded sample of distinct inputs, in input order: the same rows for the same input and seed."""
    if len(candidates) <= rows:
        return list(candidates)
    picked = set(random.Random(seed).sample(range(len(candidates)), rows))
    return [c for i, c in enumerate(candidates) if i in picked]


def _job_view(cfg: RunConfig, journal: Journal) -> None:
    """After a pilot's passes (or when one stops): seed the input once more with the job's own config, so the
    journal shows the job, never the last pass (one processor alone, the rows outside the sample held out).
    Otherwise `export`, `review serve` and `status` after a pilot showed a finished job's rows as skipped, and a
    review page's write replaced their values in the output. Each row takes the job's first-tier result this
    journal holds (the pilot's or an earlier run's); the others are pending again, for the next run."""
    prepare(cfg, journal)


def pilot_job(
    cfg: RunConfig,
    *,
    api_key: str,
    emulated: bool = False,
    rows: int = 50,
    processors: list[str] | None = None,
    seed: int = 0,
    target: float = 0.9,
    retry_failed: bool = False,
    announce: Any = None,
    install_signals: bool = True,
    transport: Any = None,
) -> PilotResult:
    """`enrich pilot`: research a seeded sample of the input's distinct inputs on each listed processor and
    forecast every strategy over the whole file (pilot.py).

    The runs are ordinary journaled runs in the job's own journal: one pass per processor, each the job on that
    processor alone with every row outside the sample held out (Journal.hold_out), so intent is recorded before
    each send, rows in doubt are reconciled, the budget is reserved first, and a (row, processor) that already
    has a result (this journal or the shared cache: Reuse.find) is never paid again, across crashes. The full
    run afterwards finds every pilot result in the journal. Before anything is sent, `announce` is given the
    pilot's worst case; a worst case (what is not paid yet) that does not fit the budget left is refused with
    ConfigError (exit 2). Nothing in the config changes; the findings go to `<output stem>.pilot.json` and a page
    beside the run report."""
    names = pilot_processors(cfg, processors)
    job = job_for(cfg)
    jpath, storage = job.journal_path, job.storage
    assert storage is not None
    journal, cache, identity = _open_paying(cfg, job, api_key, emulated, fresh=False)
    stop = _PassStop()
    here = install_signals and threading.current_thread() is threading.main_thread() and not _loop_running()
    held = contextlib.ExitStack()
    server = None
    try:
        if here:
            held.enter_context(_signals(stop))
        _admit(cfg, journal, identity, emulated, adopt=False)
        refresh = cfg.task.refresh_after_days
        reuse = Reuse(
            journal, cache, fresh_after=time.time() - refresh * 86400 if refresh else None, read=True, emulated=emulated
        )
        spent0 = journal.spent_micros()
        sample: list[tuple[str, str, str]] = []
        total = 0
        prices = {p: PROCESSORS[p].price_micros for p in names}
        for round_ in range(2):  # a second round only for pairs a stop or a crash left without a result
            for p in names:
                pcfg = _pass_config(cfg, p)
                prep = prepare(pcfg, journal, retry_failed=retry_failed)
                if not sample:
                    candidates = journal.pilot_candidates(prep.epoch)
                    total = len(candidates)
                    sample = pilot_sample(candidates, rows, seed)
                    if not sample:
                        raise ConfigError(
                            f"{cfg.input.path}: no rows to research (after [input] where): nothing to pilot"
                        )
                    _check_pilot_budget(cfg, journal, reuse, sample, names, prices, announce, total)
                    journal.set("emulated", emulated)
                    record_job(job, journal)  # the job is the config's, never a pass's
                have = reuse.find(_keys(sample, [p]))
                missing = [k for k in _keys(sample, [p]) if k not in have]
                journal.hold_out(prep.epoch, [s[0] for s in sample])
                if round_ and not missing:
                    continue
                if server is None and emulated:  # also for rows in flight on another processor (a crash)
                    server = _start_emulator(cfg)
                base_url = server.base_url if server is not None else base_url_for(cfg)
                stop.current = Stop()
                if stop.interrupted:
                    stop.current.interrupt()
                state, interrupted = _execute(
                    pcfg, journal, prep, base_url, api_key, emulated, stop.current, here, transport, None, False, reuse
                )
                end = stop_reason(state, interrupted, journal.counts(prep.epoch), api_key)
                if end.kind not in ("done", "failed_rows"):
                    _job_view(cfg, journal)
                    return PilotResult(end.exit_code, f"pilot stopped on {p}: {end.why}; run the same command again")
            have = reuse.find(_keys(sample, names))
            if all(k in have for k in _keys(sample, names)):
                break
        _job_view(cfg, journal)
        journal.set("live", None)  # the last pass's heartbeat: no run is live now
        data = _pilot_findings(cfg, journal, reuse, sample, names, prices, total, seed, target)
        data.update(
            {
                "paid_usd": round((journal.spent_micros() - spent0) / 1e6, 6),
                "emulated": emulated or _emulated(journal),
                "job": str(cfg.source or cfg.output.path),
                "seed": seed,
                "spec_hash": spec_fingerprint(cfg, build_task_spec(cfg)),
                "basis": pilot_basis(cfg),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "worst_case_usd": round(len(sample) * sum(prices.values()) / 1e6, 6),
            }
        )
        jp, hp = pilot_json_path(cfg.output.path), pilot_html_path(cfg.output.path)
        try:
            atomic_json(jp, data)
            atomic_write(hp, lambda f: f.write(pilot_page.render(data).encode()))
        except OSError as exc:
            raise write_error(jp, exc, f"every pilot result is safe in {jpath}: run the same command again") from None
        return PilotResult(EXIT_OK, "", data, jp, hp)
    finally:
        if server is not None:
            server.stop()
        journal.close()
        held.close()
        if cache is not None:
            cache.close()


def _keys(sample: list[tuple[str, str, str]], processors: list[str]) -> list[tuple[str, str, str]]:
    return [(in_h, spec_h, p) for _key, in_h, spec_h in sample for p in processors]


def _check_pilot_budget(
    cfg: RunConfig,
    journal: Journal,
    reuse: Reuse,
    sample: list[tuple[str, str, str]],
    names: list[str],
    prices: dict[str, int],
    announce: Any,
    total: int,
) -> None:
    """Say the pilot's worst case (every sampled row on every processor at list price, and what of it is not paid
    yet, beside the `total` rows to research on the strongest processor alone) before anything is sent; refuse (ConfigError, exit 2) when what is not paid yet exceeds the budget left or
    today's daily budget left (the spend ledger, across the jobs sharing it)."""
    keys = _keys(sample, names)
    found = reuse.find(keys)
    worst = len(sample) * sum(prices.values())
    todo = sum(prices[k[2]] for k in keys if k not in found)
    if announce is not None:
        announce(
            f"pilot: {len(sample)} rows x {len(names)} processors ({', '.join(names)}): worst case {usd4(worst)}"
            + (f", {usd4(todo)} of it not paid yet" if todo != worst else "")
            + _pilot_share(worst, total, names[-1], prices[names[-1]])
        )
    budget = cfg.budget_micros
    left = None if budget is None else budget - journal.spent_micros()
    if left is not None and todo > left:
        raise ConfigError(
            f"the pilot's worst case {usd4(todo)} exceeds the budget left ({usd4(max(0, left))} of "
            f"{usd4(budget or 0)}); nothing was sent: raise --budget or pass fewer --rows or --processors"
        )
    # the daily budget too: a pilot stopped by it part-way has paid for a sample it cannot report on today
    daily = cfg.limits.daily_budget_micros
    now = time.time()
    today = 0 if daily is None else daily - journal.spent_on_day(utc_day(now))
    if daily is not None and todo > today:
        raise ConfigError(
            f"the pilot's worst case {usd4(todo)} exceeds the daily budget left ({usd4(max(0, today))} of "
            f"{usd4(daily)} today, UTC; it resets at {iso_z(next_reset(now))}); nothing was sent: raise "
            "[limits] daily_budget_usd, wait for the reset, or pass fewer --rows or --processors"
        )


def _pilot_share(worst: int, total: int, strongest: str, price: int) -> str:
    """What the pilot's worst case is beside the whole file on the strongest listed processor alone: a pilot that is
    a large share of it is worth shrinking (--rows), since the runs the chosen strategy would not buy are lost.

    >>> _pilot_share(2_000_000, 503, "core", 25_000)
    '; the whole file (503 rows) on core alone: $12.5750, the pilot 16% of it'
    """
    whole = total * price
    if whole <= 0:
        return ""
    return f"; the whole file ({total:,} rows) on {strongest} alone: {usd4(whole)}, the pilot {worst / whole:.0%} of it"


def usd4(micros: int) -> str:
    return f"${micros / 1e6:,.4f}"


def _pilot_findings(
    cfg: RunConfig,
    journal: Journal,
    reuse: Reuse,
    sample: list[tuple[str, str, str]],
    names: list[str],
    prices: dict[str, int],
    total: int,
    seed: int,
    target: float,
) -> dict[str, Any]:
    """Each sampled row's result on each processor, gated with the job's gate, then pilot.compare."""
    fields = list(output_fields(build_task_spec(cfg)))
    observed = pilot_observations(cfg, journal, reuse, sample, names)
    lim = cfg.limits
    return pilot.compare(
        observed,
        fields,
        names,
        prices,
        rows_total=total,
        limits=pilot.Limits(lim.max_in_flight, lim.requests_per_minute, lim.batch_size),
        seed=seed,
        target=target,
        # `on = ["review"]` never climbs under a gate that sends nothing to review (and such a config is refused)
        ons=pilot.ONS if cfg.gate.sends_to_review() else [on for on in pilot.ONS if "rejected" in on],
    )


def pilot_basis(cfg: RunConfig) -> str:
    """What a pilot's forecast depends on besides the task spec: the gate that decided its fields and the rows the
    full run researches (the input, `[input] where`, dedupe), so `plan` never prints a forecast made under others."""
    i = cfg.input
    return digest(
        [cfg.gate.model_dump(mode="json"), str(i.path.resolve()), i.sheet, i.key, i.columns, i.where, i.dedupe], 16
    )


def pilot_estimate(cfg: RunConfig) -> str | None:
    """`plan`'s line from the job's last pilot (`<output stem>.pilot.json`): the forecast for this config's own
    strategy, or what the pilot recommends when it did not try it, or that the pilot is stale (made for another task
    spec, gate or choice of rows to research); None without a pilot."""
    path = pilot_json_path(cfg.output.path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        found = {s["name"]: s for s in data["strategies"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.get("spec_hash") != spec_fingerprint(cfg, build_task_spec(cfg)):
        return f"pilot forecast       none: {path} is for another task spec; run `enrich pilot` again"
    if data.get("basis") != pilot_basis(cfg):
        return (
            f"pilot forecast       none: {path} was made under another gate or another choice of rows to research; "
            "run `enrich pilot` again"
        )
    on = tuple(d for d in pilot.ONS[-1] if cfg.escalate and d in cfg.escalate.on)  # the pilot's order of `on`
    mine = pilot.Strategy(tuple(cfg.ladder), on)
    rec = data.get("recommended", {}).get("name")
    when = f"{data.get('sample_rows')} rows sampled {data.get('created_at', '')}".strip()
    if (s := found.get(mine.name)) is None:
        return f"pilot forecast       {mine.name} was not piloted ({when}); the pilot recommends {rec}"
    lo, hi = s["to_pay_interval_usd"]
    alo, ahi = s["accepted_interval"]
    return (
        f"pilot forecast       {mine.name}: to pay ${s['to_pay_usd']:,.4f} [${lo:,.4f}-${hi:,.4f}], accepted "
        f"{s['accepted']:.0%} [{alo:.0%}-{ahi:.0%}] ({when}; recommended: {rec})"
    )


def pilot_observations(
    cfg: RunConfig, journal: Journal, reuse: Reuse, sample: list[tuple[str, str, str]], names: list[str]
) -> list[dict[str, pilot.Observation | None]]:
    """Per sampled row (row key, input hash, spec hash), per processor: its result gated with the job's gate (None:
    no result), with the run's latency when this journal made it."""
    fields = list(output_fields(build_task_spec(cfg)))
    found = reuse.find(_keys(sample, names))
    runs = journal.pilot_runs(f.run_id for f in found.values() if f.source == "journal")
    observed: list[dict[str, pilot.Observation | None]] = []
    for _key, in_h, spec_h in sample:
        row: dict[str, pilot.Observation | None] = {}
        for p in names:
            hit = found.get((in_h, spec_h, p))
            raw: str | None = None
            latency = None
            if hit is not None and hit.source == "journal" and hit.run_id in runs:
                _proc, raw, latency = runs[hit.run_id]
            elif hit is not None and hit.cached is not None:
                raw = hit.cached.result_json
            if raw is None:
                row[p] = None
                continue
            result = json.loads(raw)
            row[p] = pilot.Observation(decide_row(result, fields, cfg.gate), output_of(result)[0], latency)
        observed.append(row)
    return observed
