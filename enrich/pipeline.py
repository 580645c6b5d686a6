"""Wires the stages: read + seed the journal -> (submit | poll | reconcile) -> write.

    prepare()  read the input, validate it, record it in the journal (no API call)
    execute()  create/reuse the job's task group, then run submit, poll and reconcile
               concurrently until every row is finished, the budget is spent, or a stop
    write      (job.py calls write.write_output) projects the journal into the output file and report

Stages share only the journal and a JobState; no module-level state, so a partition of
a big input can run anywhere with its own journal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enrich.client import TaskClient
from enrich.config import (
    RunConfig,
    build_task_spec,
    canonical,
    digest,
    legacy_spec_fingerprint,
    output_fields,
    spec_fingerprint,
)
from enrich.decide import climb_rates, escalate_pass
from enrich.errors import (
    ApiError,
    ApiUnavailable,
    ConfigError,
    InputError,
    PermanentApiError,
    TransientApiError,
    advice,
)
from enrich.files import PARQUET_SUFFIXES
from enrich.flatten import output_columns
from enrich.journal import IN_FLIGHT, DuplicateKey, Journal
from enrich.poll import Poller
from enrich.preflight import sheet_fit
from enrich.processors import PROCESSORS
from enrich.progress import JobState, show_progress
from enrich.read import RowFilter, key_problem, open_table
from enrich.reconcile import reconcile
from enrich.retry import CircuitBreaker, backoff
from enrich.reuse import Reuse
from enrich.settled import input_fingerprint
from enrich.slots import Slots
from enrich.spec import MAX_SPEC_AND_INPUT_CHARS
from enrich.spend import runs_within
from enrich.submit import Governor, Submitter

RECONCILE_GIVE_UP_S = 300.0  # listings failing this long (an outage) leave rows in doubt `unknown` for this run


@dataclass
class Prepared:
    epoch: int
    total: int
    counts: dict[str, int]
    task_spec: dict[str, Any]
    fields: dict[str, dict[str, Any]]
    job_id: str
    escalation: dict[str, int] | None = None  # dry: what the escalation pass would do after this seeding
    waiting: int = 0  # pending rows that wait for a twin's run (dedupe): no run of their own
    cached: int = 0  # dry: pending rows the shared cache holds a result for (plan)

    @property
    def job_tag(self) -> str:
        return self.job_id.replace("-", "")[:16]


def prepare(
    cfg: RunConfig, journal: Journal, retry_failed: bool = False, dry: bool = False, reuse: Reuse | None = None
) -> Prepared:
    """Read and validate the whole input, recording it in the journal in one transaction.

    Raises InputError (nothing recorded) for any bad row, ConfigError for an `[input] where` that does not
    parse, names an unknown column or cannot be evaluated. Rows it does not select are recorded as skipped;
    with `[input] dedupe` twins wait for one leader's run. With `dry`, the transaction is rolled back after
    counting (for `plan`); `reuse` then counts the pending rows its shared cache holds.
    """
    journal.dedupe = cfg.input.dedupe
    task_spec = build_task_spec(cfg)
    fields = output_fields(task_spec)
    spec_hash = spec_fingerprint(cfg, task_spec)
    if journal.get("legacy_schema") and not dry:  # schema-1 hashes included the processor: rename, never re-run
        journal.rehash_spec(legacy_spec_fingerprint(cfg, task_spec), spec_hash)
        journal.set("legacy_schema", None)
    processor = cfg.task.processor
    spec_chars = len(canonical(task_spec))
    job_id = journal.get("job_id") or str(uuid.uuid4())
    fingerprint = input_fingerprint(cfg, spec_hash)
    if (
        not dry
        and not retry_failed
        and cfg.task.refresh_after_days is None
        and fingerprint is not None
        and journal.get("seed_fingerprint") == fingerprint
    ):
        # the same file and job as the last completed seeding: nothing to re-read (a no-op resume)
        epoch = journal.get("epoch", 0)
        counts = journal.counts(epoch)
        return Prepared(epoch, sum(counts.values()), counts, task_spec, fields, job_id, waiting=journal.waiting(epoch))
    forbidden = {c[0] for c in output_columns(fields, True)}
    key_cols, in_cols = cfg.input.key, cfg.input.input_columns
    info, batches = open_table(
        cfg.input.path,
        list(dict.fromkeys([*key_cols, *in_cols])),
        forbidden,
        cfg.input.encoding,
        cfg.input.max_cell_bytes,
        sheet=cfg.input.sheet,
    )
    try:
        fit = sheet_fit(cfg.output.path, info)  # what an .xlsx output could not give back exactly
    except InputError:
        batches.close()  # type: ignore[attr-defined]
        raise
    try:
        select = (
            RowFilter(
                cfg.input.where,
                info.columns,
                text_cells=Path(info.path).suffix.lower() not in (*PARQUET_SUFFIXES, ".xlsx"),
            )
            if cfg.input.where is not None
            else None
        )
    except ConfigError:
        batches.close()  # type: ignore[attr-defined]
        raise
    pos = {c: i for i, c in enumerate(info.columns)}
    kidx, iidx = [pos[c] for c in key_cols], [(c, pos[c]) for c in in_cols]
    path = info.path
    epoch = journal.get("epoch", 0) + 1
    total = 0

    def tuples() -> Any:
        nonlocal total
        for batch in batches:
            out = []
            chosen = select.mask(batch) if select is not None else None
            for n, row in enumerate(batch):
                key_vals = [row.values[i] for i in kidx]
                if (problem := key_problem(key_vals)) is not None:
                    raise InputError(path, f"{problem} in key column(s) {key_cols}", line=row.line)
                row_key = canonical(key_vals)
                task_input = {c: row.values[i] for c, i in iidx}
                input_json = canonical(task_input)
                if len(input_json) + spec_chars > MAX_SPEC_AND_INPUT_CHARS:
                    raise InputError(
                        path,
                        f"task input is {len(input_json):,} characters; with the task spec "
                        f"({spec_chars:,}) it exceeds the API's {MAX_SPEC_AND_INPUT_CHARS:,}",
                        line=row.line,
                    )
                row_json = json.dumps(row.values, ensure_ascii=False, default=str)
                if fit is not None:
                    fit.row(row, row_json)
                out.append(
                    (
                        row_key,
                        digest([job_id, row_key], 24),
                        total,
                        row.line,
                        row_json,
                        input_json,
                        digest(input_json),
                        spec_hash,
                        processor,
                        "pending" if chosen is None or chosen[n] else "skipped",
                    )
                )
                total += 1
            yield out

    refresh = cfg.task.refresh_after_days
    refresh_before = time.time() - refresh * 86400 if refresh else None

    cached = 0

    def would_escalate() -> dict[str, int] | None:  # in the seed's transaction: sees the seeded rows
        nonlocal cached
        if reuse is not None and reuse.serving:
            cached = journal.cached_pending(epoch, reuse.serve)
        if len(cfg.ladder) < 2:
            return None
        return escalate_pass(journal, cfg, epoch, list(fields), dry=True)

    try:
        seen = journal.seed(
            tuples(),
            epoch,
            refresh_before,
            retry_failed,
            dry=dry,
            meta={
                "job_id": job_id,
                "columns": info.columns,
                "input_path": path,
                "seed_fingerprint": fingerprint,
                "arrow_schema": base64.b64encode(info.arrow_schema).decode() if info.arrow_schema else None,
                "number_formats": info.formats,  # .xlsx input: carried to .xlsx output
                "processor": cfg.task.processor,
            },
            inspect=would_escalate,
        )
    except DuplicateKey as exc:
        raise InputError(
            path,
            f"duplicate key {exc.key} in column(s) {key_cols} (first at line {exc.first_line}); keys must be unique",
            line=exc.line,
        ) from None
    finally:
        batches.close()  # type: ignore[attr-defined]  # closes the file if seeding stopped early
    counts = journal.last_seed_counts
    return Prepared(epoch, total, counts, task_spec, fields, job_id, seen, journal.last_seed_waiting, cached)


def plan_summary(cfg: RunConfig, prep: Prepared, journal: Journal) -> dict[str, Any]:
    """Rows, cached rows, runs to submit (first tier and escalation steps), estimated cost, what the budget
    covers (cheapest first, as the claim takes them) and the duration band. No API calls.

    With an escalation ladder the cost includes its steps: `ladder_worst_case_usd` has every row still to
    be run (to submit, in flight, or waiting to climb) paying every rung above where it is;
    `estimated_cost_usd` adds the expected climbs of the rows still to run once finished rows show how often a row
    climbs past each rung (`decide.climb_rates`: replayed on the results they hold, a pilot's too;
    `escalation_share` is the first rung's), and is the first step plus the steps already waiting (a lower bound)
    until then."""
    proc = PROCESSORS[cfg.task.processor]
    c = prep.counts
    # twins wait for one row's run and rows the shared cache holds need none: N distinct inputs in M rows
    to_research = c.get("pending", 0)
    to_submit = max(0, to_research - prep.waiting - prep.cached)
    in_flight = sum(c.get(s, 0) for s in ("intent", "unknown", "submitted"))
    ladder = cfg.ladder
    prices = [PROCESSORS[p].price_micros for p in ladder]
    steps: dict[str, int] = {}  # escalation steps waiting (pending on a stronger processor), then about to climb
    share = None
    room: float = math.inf  # [escalate] max_rows: how many more rows may climb (no journal yet: all of it)
    if cfg.escalate is not None and cfg.escalate.max_rows is not None:
        room = cfg.escalate.max_rows
    if len(ladder) > 1 and str(journal.path) != ":memory:":
        for p, n in journal.pending_by_processor(journal.get("epoch", 0)).items():
            if p in ladder[1:]:
                steps[p] = steps.get(p, 0) + n
        climbs: Counter[str] = Counter()
        seen = escalate_pass(journal, cfg, journal.get("epoch", 0), list(prep.fields), dry=True, targets=climbs)
        if cfg.escalate is not None and cfg.escalate.max_rows is not None:
            held = journal.escalated_count(journal.get("epoch", 0), ladder[0]) - seen["settled"] + seen["climbed"]
            room = max(0, cfg.escalate.max_rows - held)
        for p, n in climbs.items():
            steps[p] = steps.get(p, 0) + n
        rates = climb_rates(journal, cfg, journal.get("epoch", 0), list(prep.fields))
        share = rates[0] if rates else None
    n_steps = sum(steps.values())
    runs = to_submit + n_steps
    lo, hi = proc.latency_s
    waves = math.ceil((runs + in_flight) / cfg.limits.max_in_flight) if runs + in_flight else 0
    posts = math.ceil(to_submit / cfg.limits.batch_size) + sum(
        math.ceil(n / cfg.limits.batch_size) for n in steps.values()
    )
    pacing = posts * 60.0 / cfg.limits.requests_per_minute
    spent = journal.spent_micros()
    budget = cfg.budget_micros
    first_step = to_submit * proc.price_micros
    step_cost = sum(PROCESSORS[p].price_micros * n for p, n in steps.items())
    estimate = first_step + step_cost
    by_price: Counter[int] = Counter({proc.price_micros: to_submit})
    for p, n in steps.items():
        by_price[PROCESSORS[p].price_micros] += n
    ladder_info: dict[str, Any] = {}
    if len(ladder) > 1:

        def above(p: str) -> int:  # every rung from `p` up: what a step may still cost at worst
            return sum(prices[ladder.index(p) :])

        # rows in flight are paid already (spent); they may climb like rows still to submit, max_rows of them
        climbers = min(to_submit + in_flight, room)
        worst = round(first_step + climbers * sum(prices[1:]) + sum(n * above(p) for p, n in steps.items()))
        est: float | None = None
        if share is not None:  # a rung no finished row reached climbs as the rung below it did
            est = float(first_step + step_cost)
            climbing = float(to_submit + in_flight)
            rate: float = share
            for i, price in enumerate(prices[1:]):
                known = rates[i]
                rate = known if known is not None else rate
                climbing = min(climbing * rate, room) if i == 0 else climbing * rate
                est += climbing * price
            estimate = round(est)
        ladder_info = {
            "ladder": ladder,
            "first_step_cost_usd": round(first_step / 1e6, 6),
            "ladder_worst_case_usd": round(worst / 1e6, 6),
            "escalation_share": None if share is None else round(share, 4),
            "ladder_estimate_usd": None if est is None else round(est / 1e6, 6),
            "rows_left_to_climb": None if math.isinf(room) else int(room),  # [escalate] max_rows
        }
    return {
        **ladder_info,
        "rows": prep.total,
        "skipped": c.get("skipped", 0),
        "rows_to_research": to_research,
        "distinct_inputs": to_research - prep.waiting,
        "waiting_for_a_twin": prep.waiting,
        "served_from_cache": prep.cached,
        "done_or_cached": c.get("done", 0),
        "failed_kept": c.get("failed", 0) + c.get("timed_out", 0),
        "in_flight": in_flight,
        "action_required": c.get("action_required", 0),  # asked again (not paid again) by the next run
        "to_submit": to_submit,
        "escalation_steps": {p: steps[p] for p in ladder if steps.get(p, 0) > 0},
        "processor": proc.name,
        "price_per_run_usd": proc.price_micros / 1e6,
        "estimated_cost_usd": round(estimate / 1e6, 6),
        "spent_so_far_usd": round(spent / 1e6, 6),
        "budget_usd": None if budget is None else budget / 1e6,
        "runs_to_submit": runs,
        "runs_within_budget": runs_within(None if budget is None else budget - spent, dict(by_price)),
        "duration_s": [round(max(waves * lo, pacing), 1), round(waves * hi + pacing, 1)] if waves else [0, 0],
    }


def steps_line(steps: dict[str, int]) -> str:
    """The plan's line for escalation steps waiting, per processor with its price (one and partitioned jobs)."""
    each = ", ".join(f"{n:,} x {p} at ${PROCESSORS[p].price_micros / 1e6:.4f}/run" for p, n in steps.items())
    return f"escalation steps     {sum(steps.values()):,} pending ({each})"


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"rows in input        {plan['rows']:,}"]
    if plan.get("skipped"):
        lines.append(
            f"selected by where    {plan['rows'] - plan['skipped']:,}  ({plan['skipped']:,} skipped: not researched)"
        )
    if plan.get("waiting_for_a_twin") or plan.get("served_from_cache"):
        line = f"to research          {plan['distinct_inputs']:,} distinct inputs in {plan['rows_to_research']:,} rows"
        if plan.get("served_from_cache"):
            line += f"; {plan['served_from_cache']:,} of them from the shared cache (no cost)"
        lines.append(line)
    lines += [
        f"already done         {plan['done_or_cached']:,}",  # the cache's rows are on the line above
        f"failed (kept)        {plan['failed_kept']:,}   (re-run them with --retry-failed)",
        f"in flight            {plan['in_flight']:,}",
        *(
            [f"waiting for action   {plan['action_required']:,}   (asked again by this run, never paid again)"]
            if plan.get("action_required")
            else []
        ),
        f"to submit            {plan['to_submit']:,}  x {plan['processor']} at ${plan['price_per_run_usd']:.4f}/run",
    ]
    if steps := plan.get("escalation_steps"):
        lines.append(steps_line(steps))
    ladder, share = plan.get("ladder"), plan.get("escalation_share")
    cost = f"${plan['estimated_cost_usd']:,.2f}"
    if ladder and share is None:  # nothing finished yet: from no row climbing to every row climbing every rung
        cost += f" - ${plan['ladder_worst_case_usd']:,.2f}"
    lines.append(f"estimated cost       {cost}  (spent so far ${plan['spent_so_far_usd']:,.2f})")
    if plan["budget_usd"] is not None:
        lines.append(
            f"budget               ${plan['budget_usd']:,.2f}  (room for {plan['runs_within_budget']:,} of the "
            f"{plan['runs_to_submit']:,} runs to submit, first tier first)"
        )
    if ladder:
        lines.append(
            f"escalation ladder    {' -> '.join(ladder)}: ${plan['first_step_cost_usd']:,.2f} on "
            f"{plan['processor']}, worst case ${plan['ladder_worst_case_usd']:,.2f} ("
            + (
                "every row climbing every rung"
                if plan.get("rows_left_to_climb") is None
                else f"{plan['rows_left_to_climb']:,} more rows climbing every rung: max_rows"
            )
            + "); "
            + (
                f"estimate ${plan['ladder_estimate_usd']:,.2f} ({share:.0%} of finished rows climb past {ladder[0]})"
                if share is not None
                else "no finished rows yet to estimate the share that climbs"
            )
        )
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
            _note_origin(journal, client, emulated)
            return str(gid)
        except PermanentApiError as exc:
            if exc.status != 404 or not (emulated or journal.get("emulated") or client.emulator_seen):
                raise
            prices = journal.forget_remote()  # a new emulator process does not know the old group
            note = recreation_note(client.base_url, prices)
            journal.log("warning", note)
            journal.set("recreated", {"at": time.time(), "runs": len(prices), "usd": sum(prices) / 1e6, "note": note})
            if prices:
                print(f"enrich: warning: {note}", file=sys.stderr)
    group = await _retry_safe(lambda: client.create_group({"enrich_job": job_tag}))
    gid = group["taskgroup_id"]
    journal.set("taskgroup_id", gid)
    _note_origin(journal, client, emulated)
    return str(gid)


def _note_origin(journal: Journal, client: TaskClient, emulated: bool) -> None:
    """Record whose results this journal holds, as soon as the server has answered (before any run exists): the
    shared cache marks entries by it, so an emulated result is never served to a real-API job."""
    origin = "emulator" if emulated or client.emulator_seen else "api"
    if journal.get("server_origin") != origin:
        journal.set("server_origin", origin)


def recreation_note(base_url: str, prices: list[int]) -> str:
    """One line: the server no longer knows the job's task group, so the runs that were in flight there
    (one reserved price each, in micros) are created again, and what that costs (runs x price)."""
    why = (
        f"the server at {base_url} does not know this job's task group (the emulator restarted, or another --base-url)"
    )
    if not prices:
        return f"{why}: a new one is created; no run was in flight"
    each = set(prices)
    n = len(prices)
    cost = f"{n} x ${prices[0] / 1e6:.4f}" if len(each) == 1 else f"{n} runs at their processors' prices"
    return f"{why}: creating the {n} runs that were in flight again costs {cost} = ${sum(prices) / 1e6:.4f}"


async def _reconciler(
    journal: Journal, client: TaskClient, state: JobState, gid: str, job_tag: str, grace_s: float, max_retries: int
) -> None:
    """Settle rows in doubt until the job ends. Transient errors, and listings that prove nothing (incomplete:
    cut, or carrying an `error` event), are retried for at most RECONCILE_GIVE_UP_S; anything else stops
    the job at once."""
    attempt = 0
    failing_since = 0.0

    def give_up(why: str) -> bool:
        """One more failed round; True (rows left `unknown` for a later run) once they have failed too long."""
        nonlocal attempt, failing_since
        attempt += 1
        failing_since = failing_since if attempt > 1 else time.monotonic()
        if time.monotonic() - failing_since >= RECONCILE_GIVE_UP_S:
            # never resubmit blindly: these rows stay `unknown` (reported) until a later run can list the group
            state.reconcile_failed = True
            journal.log(
                "error",
                f"cannot list the task group to settle rows in doubt: {why}; they are reported "
                "as unknown and will be reconciled on the next run",
            )
            return True
        journal.log("warning", f"reconciliation: {why}")
        return False

    while True:
        if not journal.unresolved():
            state.unresolved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.unresolved.wait(), 5.0)
            continue
        try:
            out = await reconcile(journal, client, gid, job_tag, grace_s, max_retries, posting=state.posting)
        except TransientApiError as exc:
            if give_up(str(exc)):
                return
            await asyncio.sleep(backoff(attempt, 0.5, exc.retry_after, cap=10))
            continue
        except ApiError as exc:
            journal.log("error", str(exc))
            state.fatal = exc
            state.stop.set()
            return
        if out.adopted:
            state.reload_runs = True
            state.new_runs.set()
        if out.missing:  # released: their slots are free again
            state.active.give(out.missing)
            state.backlog.give(out.missing)
        if out.incomplete:  # no evidence of absence yet: list again later
            if give_up(out.incomplete):
                return
            await asyncio.sleep(backoff(attempt, 0.5, cap=10))
            continue
        attempt = 0
        if out.next_check is not None:
            await asyncio.sleep(max(0.05, out.next_check - time.time()))
        elif not out.adopted and not out.missing:
            await asyncio.sleep(0.5)  # rows in doubt whose POST is still in flight


def _escalate(journal: Journal, cfg: RunConfig, epoch: int, names: list[str], state: JobState) -> int:
    """One escalation pass, skipped when nothing it reads changed since the last one (a no-op resume of a
    finished million-row job must not re-merge every row); returns the rows climbed. Rows whose waiting step
    settled (decide.escalate_pass) count as finished in `state`."""
    gate = [
        cfg.ladder,
        cfg.gate.model_dump(mode="json"),
        cfg.escalate.model_dump(mode="json") if cfg.escalate else None,
    ]
    if journal.get("escalation_checked") == digest([journal.write_state(), gate]):
        return 0
    moved = escalate_pass(journal, cfg, epoch, names)
    journal.set("escalation_checked", digest([journal.write_state(), gate]))
    state.done_before += moved["settled"]
    return moved["climbed"]


async def _heartbeat(journal: Journal, state: JobState, every_s: float = 2.0) -> None:
    """Record what the live job is doing, for `enrich status` in another terminal."""
    while True:
        journal.set(
            "live",
            {
                "pid": os.getpid(),
                "at": time.time(),
                "waiting_on": state.waiting_on,
                "active_runs": state.active.used,
                "unrecorded_runs": state.backlog.used,
                "cap": state.active.capacity,
                "submitted": state.submitted,
                "completed": state.completed,
                "failed": state.failed,
            },
        )
        await asyncio.sleep(every_s)


async def execute(
    cfg: RunConfig,
    journal: Journal,
    client: TaskClient,
    prep: Prepared,
    *,
    emulated: bool,
    state: JobState | None = None,
    governor: Governor | None = None,
    detach: bool = False,
    reuse: Reuse | None = None,
) -> JobState:
    """Run the job until every row is finished, the budget is spent, or `state.stop` is set.

    With `detach`, only submit: every pending row is sent (rate limit and budget apply; the
    in-flight cap does not, since nothing waits on the runs), rows in doubt are settled, and the
    job returns; a later run without `detach` collects the results. `reuse` is the job's result reuse: its
    shared cache is read before the first claim and in every claim, and written after every recorded result."""
    counts = journal.counts(prep.epoch)
    state = state or JobState()
    held = journal.held_out(prep.epoch)  # a pilot's pass: the rows outside its sample are set aside, not finished
    state.total = prep.total - held
    state.done_before = sum(counts.get(s, 0) for s in ("done", "failed", "timed_out", "skipped")) - held
    state.spent_micros = journal.spent_micros()
    names = list(prep.fields)
    if reuse is not None:
        reuse.publish()  # results a killed run recorded but did not publish yet
    if cfg.escalate is not None:  # finished rows whose fields still need a stronger processor climb first
        state.escalated += _escalate(journal, cfg, prep.epoch, names, state)
        counts = journal.counts(prep.epoch)
    if journal.recheck_held():  # runs that waited for an action: asked again before anything is sent
        counts = journal.counts(prep.epoch)
        state.done_before = sum(counts.get(s, 0) for s in ("done", "failed", "timed_out"))
    in_flight = journal.in_flight_count()
    if counts.get("pending", 0) == 0 and in_flight == 0:
        return state  # nothing to do: no request at all
    try:
        gid = await ensure_group(journal, client, prep.job_tag, emulated)
    except TransientApiError as exc:
        raise ApiUnavailable(
            f"cannot reach the API at {client.base_url} ({exc}); "
            + advice(
                "check --base-url and the network, or use --emulator. Nothing was sent; run the same command again",
                "check base_url= and the network, or pass emulator=True. Nothing was sent; call enrich_frame again",
            )
        ) from None
    if reuse is not None:
        reuse.publish()
        if reuse.serving:  # every pending row the shared cache holds is done before the first claim
            reuse.serve_pending(prep.epoch)
            state.reused = journal.reused_moves
    limits = cfg.limits
    cap = 10**9 if detach else limits.max_in_flight
    state.active = Slots(cap)
    state.backlog = Slots(cap + limits.batch_size)
    in_flight = journal.in_flight_count()
    state.active.preload(in_flight)
    state.backlog.preload(in_flight)
    t = cfg.task
    options = {
        k: v
        for k, v in (("source_policy", t.source_policy), ("previous_interaction_id", t.previous_interaction_id))
        if v is not None
    }
    submitter = Submitter(
        journal,
        client,
        state,
        taskgroup_id=gid,
        job_tag=prep.job_tag,
        epoch=prep.epoch,
        prices={name: p.price_micros for name, p in PROCESSORS.items()},
        budget_micros=cfg.budget_micros,
        task_spec=prep.task_spec,
        run_options=options,
        user_metadata=t.metadata,
        batch_size=limits.batch_size,
        requests_per_minute=limits.requests_per_minute,
        request_timeout_s=limits.request_timeout_s,
        max_retries=limits.max_attempts,
        outage_give_up_s=limits.outage_give_up_s,
        breaker=CircuitBreaker(),
        governor=governor,
        daily_budget_micros=limits.daily_budget_micros,
        first_tier=cfg.ladder[0],
        serve=reuse.serve if reuse is not None and reuse.serving else None,
    )
    poller = Poller(
        journal,
        client,
        state,
        taskgroup_id=gid,
        job_tag=prep.job_tag,
        row_timeout_s=limits.row_timeout_s,
        recheck_s=limits.recheck_s,
        on_recorded=reuse.publish if reuse is not None else None,
    )
    if journal.unresolved():
        state.unresolved.set()
    background = [
        asyncio.ensure_future(
            _reconciler(journal, client, state, gid, prep.job_tag, limits.reconcile_grace_s, limits.max_attempts)
        ),
        asyncio.ensure_future(show_progress(state)),
        asyncio.ensure_future(_heartbeat(journal, state)),
    ]
    if not detach:
        background.append(asyncio.ensure_future(poller.run()))

    def crashed(task: asyncio.Future[Any]) -> None:
        """A stage that dies unexpectedly stops the job (its state is in the journal) instead of hanging it."""
        if not task.cancelled() and task.exception() is not None:
            state.fatal = task.exception()
            state.stop.set()

    for task in background:
        task.add_done_callback(crashed)
    try:
        while True:
            await submitter.run()
            if detach:  # settle rows in doubt, then leave the runs to the API
                while not state.stop.is_set() and not state.reconcile_failed and journal.unresolved():
                    state.waiting_on = "settling rows in doubt before detaching"
                    await asyncio.sleep(0.5)
                break
            # submission is over (all sent, budget spent, or stopped): let in-flight rows finish
            while not state.stop.is_set():
                live = journal.in_flight_count(("submitted",) if state.reconcile_failed else IN_FLIGHT)
                if live == 0:
                    break
                state.waiting_on = f"{live} runs to finish at the API"
                await state.backlog.wait_change(0.5)
            if state.stop.is_set() or cfg.escalate is None or state.budget_exhausted:
                break
            climbed = _escalate(journal, cfg, prep.epoch, names, state)  # the next rung of the ladder
            if not climbed:
                break
            state.escalated += climbed
            state.submitter_done = False
    finally:
        state.stop.set()
        for task in background:
            task.cancel()
        # bounded: on Python 3.11 asyncio.wait_for can swallow a cancellation, and shutdown must not hang
        await asyncio.wait(background, timeout=5)
        state.spent_micros = journal.spent_micros()
        journal.set("events_cursor", poller.cursor)
        if reuse is not None:
            reuse.publish()
    state.requests = client.requests
    return state
