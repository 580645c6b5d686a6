"""Wires the stages: read + seed the journal -> (submit | poll | reconcile) -> write.

    prepare()  read the input, validate it, record it in the journal (no API call)
    execute()  create/reuse the job's task group, then run submit, poll and reconcile
               concurrently until every row is finished, the budget is spent, or a stop
    write      (cli.py) projects the journal into the output file and report

Stages share only the journal and a JobState; no module-level state, so a partition of
a big input can run anywhere with its own journal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from enrich.client import TaskClient
from enrich.config import RunConfig, build_task_spec, canonical, digest, output_fields, spec_fingerprint
from enrich.errors import ApiError, InputError, PermanentApiError, TransientApiError
from enrich.flatten import output_columns
from enrich.journal import DuplicateKey, Journal, forget_remote
from enrich.poll import Poller
from enrich.processors import PROCESSORS
from enrich.progress import JobState, show_progress
from enrich.read import key_problem, open_table
from enrich.reconcile import reconcile
from enrich.retry import CircuitBreaker, backoff
from enrich.spec import MAX_SPEC_AND_INPUT_CHARS
from enrich.submit import Submitter

RECONCILE_GIVE_UP_S = 300.0   # listings failing this long (an outage) leave rows in doubt `unknown` for this run


@dataclass
class Prepared:
    epoch: int
    total: int
    counts: dict[str, int]
    task_spec: dict[str, Any]
    fields: dict[str, dict[str, Any]]
    job_id: str

    @property
    def job_tag(self) -> str:
        return self.job_id.replace("-", "")[:16]


def prepare(cfg: RunConfig, journal: Journal, retry_failed: bool = False, dry: bool = False) -> Prepared:
    """Read and validate the whole input, recording it in the journal in one transaction.

    Raises InputError (nothing recorded) for any bad row. With `dry`, the transaction is
    rolled back after counting (for `plan`).
    """
    task_spec = build_task_spec(cfg)
    fields = output_fields(task_spec)
    spec_hash = spec_fingerprint(cfg, task_spec)
    spec_chars = len(canonical(task_spec))
    job_id = journal.get("job_id") or str(uuid.uuid4())
    fingerprint = _input_fingerprint(cfg, spec_hash)
    if (not dry and not retry_failed and cfg.task.refresh_after_days is None and fingerprint is not None
            and journal.get("seed_fingerprint") == fingerprint):
        # the same file and job as the last completed seeding: nothing to re-read (a no-op resume)
        epoch = journal.get("epoch", 0)
        counts = journal.counts(epoch)
        return Prepared(epoch, sum(counts.values()), counts, task_spec, fields, job_id)
    forbidden = {c[0] for c in output_columns(fields, True)}
    key_cols, in_cols = cfg.input.key, cfg.input.input_columns
    info, batches = open_table(cfg.input.path, list(dict.fromkeys([*key_cols, *in_cols])), forbidden,
                               cfg.input.encoding, cfg.input.max_cell_bytes)
    pos = {c: i for i, c in enumerate(info.columns)}
    kidx, iidx = [pos[c] for c in key_cols], [(c, pos[c]) for c in in_cols]
    path = info.path
    epoch = journal.get("epoch", 0) + 1
    total = 0

    def tuples() -> Any:
        nonlocal total
        for batch in batches:
            out = []
            for row in batch:
                key_vals = [row.values[i] for i in kidx]
                if (problem := key_problem(key_vals)) is not None:
                    raise InputError(path, f"{problem} in key column(s) {key_cols}", line=row.line)
                row_key = canonical(key_vals)
                task_input = {c: row.values[i] for c, i in iidx}
                input_json = canonical(task_input)
                if len(input_json) + spec_chars > MAX_SPEC_AND_INPUT_CHARS:
                    raise InputError(path, f"task input is {len(input_json):,} characters; with the task spec "
                                           f"({spec_chars:,}) it exceeds the API's {MAX_SPEC_AND_INPUT_CHARS:,}",
                                     line=row.line)
                out.append((row_key, digest([job_id, row_key], 24), total, row.line,
                            json.dumps(row.values, ensure_ascii=False, default=str), input_json,
                            digest(input_json), spec_hash))
                total += 1
            yield out

    refresh = cfg.task.refresh_after_days
    refresh_before = time.time() - refresh * 86400 if refresh else None
    try:
        journal.seed(tuples(), epoch, refresh_before, retry_failed, dry=dry,
                     meta={"job_id": job_id, "columns": info.columns, "input_path": path,
                           "seed_fingerprint": fingerprint,
                           "arrow_schema": base64.b64encode(info.arrow_schema).decode() if info.arrow_schema else None,
                           "processor": cfg.task.processor})
    except DuplicateKey as exc:
        raise InputError(path, f"duplicate key {exc.key} in column(s) {key_cols} (first at line {exc.first_line}); "
                               "keys must be unique", line=exc.line) from None
    finally:
        batches.close()  # type: ignore[attr-defined]  # closes the file if seeding stopped early
    counts = journal.last_seed_counts
    return Prepared(epoch, total, counts, task_spec, fields, job_id)


def _input_fingerprint(cfg: RunConfig, spec_hash: str) -> str | None:
    """Identity of (input file bytes, how it is read, the task): equal means seeding would change nothing."""
    import hashlib

    try:
        st = cfg.input.path.stat()
        h = hashlib.sha256()
        with cfg.input.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return digest([str(cfg.input.path.resolve()), st.st_size, st.st_mtime_ns, h.hexdigest(), cfg.input.key,
                   cfg.input.input_columns, cfg.input.encoding, cfg.input.max_cell_bytes, spec_hash])


def plan_summary(cfg: RunConfig, prep: Prepared, journal: Journal) -> dict[str, Any]:
    """Rows, cached rows, rows to submit, estimated cost and duration band. No API calls."""
    proc = PROCESSORS[cfg.task.processor]
    c = prep.counts
    to_submit = c.get("pending", 0)
    in_flight = sum(c.get(s, 0) for s in ("intent", "unknown", "submitted"))
    lo, hi = proc.latency_s
    waves = math.ceil((to_submit + in_flight) / cfg.limits.max_in_flight) if to_submit + in_flight else 0
    posts = math.ceil(to_submit / cfg.limits.batch_size)
    pacing = posts * 60.0 / cfg.limits.requests_per_minute
    spent = journal.spent_micros()
    budget = cfg.budget_micros
    return {
        "rows": prep.total, "done_or_cached": c.get("done", 0), "failed_kept": c.get("failed", 0) + c.get("timed_out", 0),
        "in_flight": in_flight, "to_submit": to_submit, "processor": proc.name,
        "price_per_run_usd": proc.price_micros / 1e6, "estimated_cost_usd": round(to_submit * proc.price_micros / 1e6, 6),
        "spent_so_far_usd": round(spent / 1e6, 6),
        "budget_usd": None if budget is None else budget / 1e6,
        "runs_within_budget": None if budget is None else max(0, (budget - spent) // proc.price_micros),
        "duration_s": [round(max(waves * lo, pacing), 1), round(waves * hi + pacing, 1)] if waves else [0, 0],
    }


def format_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"rows in input        {plan['rows']:,}",
        f"already done/cached  {plan['done_or_cached']:,}",
        f"failed (kept)        {plan['failed_kept']:,}   (re-run them with --retry-failed)",
        f"in flight            {plan['in_flight']:,}",
        f"to submit            {plan['to_submit']:,}  x {plan['processor']} at ${plan['price_per_run_usd']:.4f}/run",
        f"estimated cost       ${plan['estimated_cost_usd']:,.2f}  (spent so far ${plan['spent_so_far_usd']:,.2f})",
    ]
    if plan["budget_usd"] is not None:
        lines.append(f"budget               ${plan['budget_usd']:,.2f}  (room for {plan['runs_within_budget']:,} runs)")
    lo, hi = plan["duration_s"]
    lines.append(f"expected duration    {_human(lo)} - {_human(hi)}")
    return "\n".join(lines)


def _human(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}min"
    return f"{s / 3600:.1f}h"


async def _retry_safe(call: Any, attempts: int = 6) -> Any:
    """Retry an idempotent call on TransientApiError (backoff, Retry-After); other errors propagate."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except TransientApiError as exc:
            if attempt == attempts:
                raise
            await asyncio.sleep(backoff(attempt, 0.5, exc.retry_after, cap=10))
    raise AssertionError("unreachable")


async def ensure_group(journal: Journal, client: TaskClient, job_tag: str, emulated: bool) -> str:
    """The job's task group: reuse the journal's, or create one and record it.

    Creating a group is free, so a lost create reply only leaves an empty group behind.
    """
    gid = journal.get("taskgroup_id")
    if gid:
        try:
            await _retry_safe(lambda: client.get_group(gid))
            return str(gid)
        except PermanentApiError as exc:
            if exc.status != 404 or not emulated:
                raise
            n = forget_remote(journal)   # a new emulator process does not know the old group
            journal.log("warning", f"emulator restarted: {n} in-flight rows will run again in the new emulator")
    group = await _retry_safe(lambda: client.create_group({"enrich_job": job_tag}))
    gid = group["taskgroup_id"]
    journal.set("taskgroup_id", gid)
    return str(gid)


async def _reconciler(journal: Journal, client: TaskClient, state: JobState, gid: str, job_tag: str,
                      grace_s: float, max_retries: int) -> None:
    attempt = 0
    failing_since = 0.0
    while True:
        if not journal.unresolved():
            state.unresolved.clear()
            await state.unresolved.wait()
            continue
        try:
            out = await reconcile(journal, client, gid, job_tag, grace_s, max_retries)
            attempt = 0
        except ApiError as exc:
            attempt += 1
            failing_since = failing_since if attempt > 1 else time.monotonic()
            if time.monotonic() - failing_since >= RECONCILE_GIVE_UP_S:
                # never resubmit blindly: these rows stay `unknown` (reported) until a later run can list the group
                state.reconcile_failed = True
                journal.log("error", f"cannot list the task group to settle rows in doubt: {exc}; they are reported "
                                     "as unknown and will be reconciled on the next run")
                state.slots.set()
                return
            journal.log("warning", f"reconciliation: {exc}")
            await asyncio.sleep(backoff(attempt, 0.5, exc.retry_after, cap=10))
            continue
        if out.adopted:
            state.reload_runs = True
            state.new_runs.set()
        if out.missing:
            state.freed(out.missing)
        if out.next_check is not None:
            await asyncio.sleep(max(0.05, out.next_check - time.time()))


async def execute(cfg: RunConfig, journal: Journal, client: TaskClient, prep: Prepared, *, emulated: bool,
                  state: JobState | None = None) -> JobState:
    """Run the job until every row is finished, the budget is spent, or `state.stop` is set."""
    counts = journal.counts(prep.epoch)
    state = state or JobState()
    state.total = prep.total
    state.done_before = sum(counts.get(s, 0) for s in ("done", "failed", "timed_out"))
    state.in_flight = sum(counts.get(s, 0) for s in ("intent", "unknown", "submitted"))
    state.spent_micros = journal.spent_micros()
    if counts.get("pending", 0) == 0 and state.in_flight == 0:
        return state   # nothing to do: no request at all
    gid = await ensure_group(journal, client, prep.job_tag, emulated)
    state.in_flight = sum(journal.counts(prep.epoch).get(s, 0) for s in ("intent", "unknown", "submitted"))
    t = cfg.task
    options = {k: v for k, v in (("source_policy", t.source_policy),
                                 ("previous_interaction_id", t.previous_interaction_id)) if v is not None}
    proc = PROCESSORS[t.processor]
    limits = cfg.limits
    submitter = Submitter(journal, client, state, taskgroup_id=gid, job_tag=prep.job_tag, epoch=prep.epoch,
                          processor=t.processor, price_micros=proc.price_micros, budget_micros=cfg.budget_micros,
                          task_spec=prep.task_spec, run_options=options, user_metadata=t.metadata,
                          max_in_flight=limits.max_in_flight, batch_size=limits.batch_size,
                          requests_per_minute=limits.requests_per_minute, max_retries=limits.max_attempts,
                          breaker=CircuitBreaker())
    poller = Poller(journal, client, state, taskgroup_id=gid, row_timeout_s=limits.row_timeout_s)
    if journal.unresolved():
        state.unresolved.set()
    background = [
        asyncio.ensure_future(poller.run()),
        asyncio.ensure_future(_reconciler(journal, client, state, gid, prep.job_tag, limits.reconcile_grace_s,
                                          limits.max_attempts)),
        asyncio.ensure_future(show_progress(state)),
    ]

    def crashed(task: asyncio.Future[Any]) -> None:
        """A stage that dies unexpectedly stops the job (its state is in the journal) instead of hanging it."""
        if not task.cancelled() and task.exception() is not None:
            state.fatal = task.exception()
            state.stop.set()

    for task in background:
        task.add_done_callback(crashed)
    try:
        await submitter.run()
        # submission is over (all sent, budget spent, or stopped): let in-flight rows finish
        while not state.stop.is_set():
            live = journal.in_flight_count(prep.epoch, ("submitted",) if state.reconcile_failed else None)
            if live == 0:
                break
            state.resync(live)
            state.slots.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.slots.wait(), 0.5)
    finally:
        state.stop.set()
        for task in background:
            task.cancel()
        # bounded: on Python 3.11 asyncio.wait_for can swallow a cancellation, and shutdown must not hang
        await asyncio.wait(background, timeout=5)
        state.spent_micros = journal.spent_micros()
        journal.set("events_cursor", poller.cursor)
    state.requests = client.requests
    return state
