"""The one entry point that runs a job: `run_job(config, ...) -> JobResult`.

The CLI, the notebook API and each Ray partition all call it. It checks everything that can be
known before the first paid request (paths, key, journal identity, a journal that lost its
rows), records the input, runs the stages against the API (or the embedded emulator), writes
the output, and says how the job ended as an exit code with one line of explanation. It never
calls `sys.exit` and raises only the error tree's exceptions (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enrich import failpoints
from enrich.config import DEFAULT_BASE_URL, RunConfig, digest
from enrich.errors import AuthError, ConfigError, JournalError, OutputError, PaymentRequired, redact

EXIT_OK, EXIT_USAGE, EXIT_FAILED_ROWS, EXIT_BUDGET, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = (
    0,
    2,
    3,
    4,
    5,
    69,
    75,
)
EXIT_CODES = {
    EXIT_OK: "all rows completed",
    EXIT_USAGE: "usage, config or input error (nothing was sent)",
    EXIT_FAILED_ROWS: "finished with failed, timed-out or unknown rows",
    EXIT_BUDGET: "budget exhausted (rows skipped_budget)",
    EXIT_AUTH: "auth or payment error (401/402/403)",
    EXIT_UNAVAILABLE: "the API could not be reached (resumable)",
    EXIT_INTERRUPTED: "interrupted (resumable: run the same command again)",
}


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
        from enrich.journal import Journal

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
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

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
    from enrich.config import spec_fingerprint

    return {
        "output": str(cfg.output.path.resolve()),
        "task_spec": spec_fingerprint(cfg, task_spec),
        "key_columns": list(cfg.input.key),
        "api_key": digest(["enrich-key", api_key], 16),
    }


def run_job(
    cfg: RunConfig,
    *,
    api_key: str,
    emulated: bool = False,
    retry_failed: bool = False,
    adopt: bool = False,
    fresh: bool = False,
    on_interrupt: Callable[[], None] | None = None,
    install_signals: bool = True,
    transport: Any = None,
    governor: Any = None,
    detach: bool = False,
) -> JobResult:
    """Run (or resume) one job to its end and write its output. See the module docstring.

    `transport` is the client's seam (an httpx transport) for tests that play server behaviours;
    `governor` (submit.Governor) enforces limits shared with other partitions of the same job;
    `detach` submits everything and returns without waiting for results (collect with a later run)."""
    from enrich import preflight
    from enrich.config import build_task_spec
    from enrich.journal import Journal
    from enrich.write import remove_stale_temps

    cpu0 = time.process_time()
    if detach and emulated:
        raise ConfigError(
            "--detach needs a server that outlives this process; with --emulator, start "
            "`enrich emulator` separately and pass --base-url (any PARALLEL_API_KEY, e.g. 'local')"
        )
    jpath = journal_path_for(cfg)
    preflight.check_job(cfg, api_key=api_key, emulated=emulated, journal_path=jpath)  # before anything is paid
    identity = _identity(cfg, build_task_spec(cfg), api_key)
    if fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{jpath}{suffix}").unlink(missing_ok=True)
    journal = Journal.open(jpath)
    remove_stale_temps(cfg.output.path)
    server = None
    try:
        if journal.is_empty() and not fresh and output_has_run_ids(cfg.output.path):
            raise JournalError(
                f"{jpath}: journal is missing or empty, but {cfg.output.path} holds researched rows "
                "with run ids; running now would pay for them again. Restore the journal, or pass "
                "--fresh to start over"
            )
        mode = journal.get("emulated")
        if mode is not None and mode != emulated and journal.get("taskgroup_id"):
            raise JournalError(
                f"{jpath}: this journal holds {'emulated' if mode else 'real'} results; "
                f"use another --journal for {'emulated' if emulated else 'real'} runs"
            )
        journal.check_identity(identity, adopt)
        if cfg.limits.daily_budget_usd is not None or cfg.limits.spend_ledger is not None:
            journal.attach_ledger(cfg.limits.spend_ledger, str(journal.path))
        from enrich.pipeline import prepare

        prep = prepare(cfg, journal, retry_failed=retry_failed)
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
        if emulated:
            server = _start_emulator(cfg)
            base_url = server.base_url
        else:
            base_url = base_url_for(cfg)
        state, interrupted = _execute(
            cfg, journal, prep, base_url, api_key, emulated, on_interrupt, install_signals, transport, governor, detach
        )
        result = _finish(cfg, journal, jpath, prep, state, interrupted, emulated, api_key, cpu0)
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
    on_interrupt: Callable[[], None] | None,
    install_signals: bool,
    transport: Any,
    governor: Any,
    detach: bool = False,
) -> tuple[Any, bool]:
    from enrich.client import TaskClient
    from enrich.pipeline import execute
    from enrich.progress import JobState

    state = JobState()
    interrupted = False

    async def on_response(response: Any) -> None:
        if response.request.method == "POST" and response.request.url.path.endswith("/runs"):
            failpoints.hit("after_send_before_response")

    async def main() -> Any:
        nonlocal interrupted
        loop = asyncio.get_running_loop()

        def stop() -> None:
            nonlocal interrupted
            if interrupted:  # a second Ctrl-C: leave now; every commit already made is durable
                print("enrich: interrupted again; exiting at once (the journal is intact)", file=sys.stderr)
                os._exit(EXIT_INTERRUPTED)
            interrupted = True
            print("enrich: stopping (Ctrl-C again to leave at once)...", file=sys.stderr)
            if on_interrupt:
                on_interrupt()
            state.stop.set()

        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, stop)
        client = TaskClient(
            base_url, api_key, timeout_s=cfg.limits.request_timeout_s, on_response=on_response, transport=transport
        )
        try:
            return await execute(
                cfg, journal, client, prep, emulated=emulated, state=state, governor=governor, detach=detach
            )
        finally:
            await client.aclose()
            if client.emulator_seen and not emulated:
                journal.set("emulator_seen", True)  # reached an emulator through --base-url: mark the output

    _run_coroutine(main())
    if interrupted and install_signals:  # "Ctrl-C again to leave at once" holds while the output is written too
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
    return state, interrupted


def _run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from inside a running event loop (Jupyter): then on a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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
) -> JobResult:
    from enrich.write import write_output

    emulated = emulated or bool(journal.get("emulated")) or bool(journal.get("emulator_seen"))
    counts = journal.counts(prep.epoch)
    why = _why_stopped(state, interrupted, api_key)
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
                "budget_usd": cfg.limits.budget_usd,
                "interrupted": interrupted,
                "runs_created_this_invocation": state.submitted,
                "rows_escalated_this_invocation": state.escalated,
                "ladder": cfg.ladder,
                "http_requests_this_invocation": state.requests,
                "stopped_because": why,
                "elapsed_s": round(time.monotonic() - state.started, 3),
                "cpu_s": round(time.process_time() - cpu0, 3),
            },
        )
    except OSError as exc:
        raise OutputError(
            f"cannot write {cfg.output.path}: {exc.strerror or exc}; every result is safe in {jpath}: "
            f"fix the folder, then run the same command again (or enrich export {jpath} --output "
            "FILE)"
        ) from None
    if why:
        journal.log("error", why)
    journal.set("live", None)
    sc = report["status_counts"]
    summary = (
        f"wrote {report['rows']} rows to {cfg.output.path} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(sc.items()))}); spent ${report['spend_usd']:.4f}"
        f"{' [EMULATED]' if emulated else ''}"
    )
    if emulated and report.get("rows_with_answer") == 0 and report.get("status_counts", {}).get("completed"):
        summary += (
            f"\nwarning: the emulator answered no field for any row: either no input row matches its "
            f"knowledge table on column {cfg.emulator.knowledge_key!r}, or the table has no column named "
            "like the output fields; set [emulator] knowledge and knowledge_key (README, The emulator)"
        )
    result = JobResult(EXIT_OK, summary, report, counts, cfg.output.path, jpath, deferred=state.budget_deferred)
    if isinstance(state.fatal, AuthError | PaymentRequired):
        result.exit_code, result.message = EXIT_AUTH, f"{summary}\nstopped: {why}"
    elif state.fatal is not None:
        result.exit_code, result.message = EXIT_FAILED_ROWS, f"{summary}\nstopped: {why}"
    elif interrupted:
        result.exit_code = EXIT_INTERRUPTED
        result.message = f"{summary}\ninterrupted; progress is saved in {jpath}"
    elif state.unreachable:
        result.exit_code, result.message = EXIT_UNAVAILABLE, f"{summary}\nstopped: {why}"
    elif counts.get("pending", 0) and state.budget_exhausted:
        result.exit_code = EXIT_BUDGET
        result.message = f"{summary}\n{state.budget_message or 'budget exhausted'}: {_skipped(cfg, journal, prep, sc)}"
    elif any(counts.get(s, 0) for s in ("failed", "timed_out", "unknown", "intent", "pending", "submitted")):
        result.exit_code = EXIT_FAILED_ROWS
    return result


def _skipped(cfg: RunConfig, journal: Any, prep: Any, status_counts: dict[str, int]) -> str:
    """What the budget left undone, in two counts that match the output: rows never researched (their
    status is skipped_budget) and escalation steps not run (those rows show their best answer so far)."""
    return left_undone(cfg, journal.pending_by_processor(prep.epoch), status_counts)


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


def _why_stopped(state: Any, interrupted: bool, api_key: str) -> str | None:
    """One line saying why rows may still be pending, for the report and the output's readers."""
    if state.fatal is not None:
        return redact(str(state.fatal), api_key)
    if state.unreachable:
        return redact(state.unreachable, api_key)
    if interrupted:
        return "interrupted"
    if state.reconcile_failed:
        return "the task group could not be listed; rows in doubt are reported as unknown"
    return None
