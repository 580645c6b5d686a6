"""The emulator's state: runs, groups, simulated time, credit, rate limits, faults and ledger.

No I/O here: the ASGI app (app.py) calls these methods from its single event loop, so no
locks are needed. Time is lazy and cheap: each run gets a start and a completion instant
(seeded draw from its processor's latency band x time_scale) pushed on two heaps; `advance()`
pops what is due, appends completion events to the group's event log and wakes waiters.
Nothing is polled per run, so 20,000+ active runs cost only their heap entries.

Switchable behaviours (behaviours.py) that live in the state: `endings` (runs that end failed
or cancelled), `eventual` (a run's group event waits on a third heap until the run is
visible; listings stop at the first run not yet visible; some runs of a batch finish at once),
`basis` (varied output and run objects), `action` (runs that stop in action_required until
`act()`), `echo` (metadata echoed as other JSON types) and `expiry` (cursors that expire). All draws for them come from `brng`, a generator
of their own, so switching one on does not change the runs, latencies or faults of a seed.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from enrich.emulator import behaviours as bh
from enrich.emulator.knowledge import Knowledge, Quality
from enrich.emulator.validate import Invalid, normalize_output_schema, validate_run_input
from enrich.processors import PROCESSORS

FAULT_KINDS = ("429", "422", "500", "503", "drop", "slow", "truncate")  # 422: add-runs only (a rejected batch)
MAX_GROUP_INPUTS = 1000


@dataclass
class EmulatorConfig:
    """Everything `enrich emulator` takes on its command line."""

    knowledge: str | None = None  # CSV/Parquet table; None = the bundled companies table
    knowledge_key: str = "company"
    time_scale: float = 1.0  # multiplies the published latency bands; 0 = instant
    seed: int = 0
    fail_rate: float = 0.0  # share of runs that end `failed`
    rate_limit: int = 2000  # creating POSTs per minute per key; 0 = off
    credit_usd: float | None = None  # None = unlimited credit
    faults: str = ""  # e.g. "429=0.05,500=0.02,drop=0.02,retry_after=2"
    api_key: str | None = None  # accept only this key; None = any non-empty key
    behaviours: str = ""  # e.g. "cut,snapshots" or "all" (behaviours.py)
    hard_rate: float = 0.0  # share of (row, field) cells that need a stronger processor


def parse_faults(spec: str) -> dict[str, float]:
    """Parse a fault spec: `parse_faults("429=0.05,drop=0.1")` -> {'429': 0.05, 'drop': 0.1}.

    Keys are fault kinds with a probability, plus `retry_after` (seconds sent with injected 429s)
    and `slow_s` (how long a `slow` response is held, default 35 s).
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in (*FAULT_KINDS, "retry_after", "slow_s"):
            raise ValueError(f"bad fault {part!r}: expected KIND=VALUE with KIND in {', '.join(FAULT_KINDS)}")
        out[name] = float(value)
        if name in FAULT_KINDS and not 0 <= out[name] <= 1:
            raise ValueError(f"fault probability for {name} must be within 0..1")
    if sum(out.get(k, 0) for k in FAULT_KINDS) > 1:
        raise ValueError("fault probabilities add up to more than 1")
    return out


class Run:
    """One run, kept compact (a million finished runs fit in well under 1 GB): its request body as
    compact JSON bytes, two formatted timestamps instead of a cache, and no stored output (answers
    are regenerated on demand; they are deterministic per seed)."""

    __slots__ = (
        "_body",
        "action",
        "created",
        "created_s",
        "done",
        "done_at",
        "end",
        "error",
        "group",
        "modified_s",
        "price",
        "processor",
        "run_id",
        "seq",
        "spec",
        "stale_s",
        "start_at",
        "started",
        "visible_at",
        "warnings",
    )

    def __init__(
        self,
        run_id: str,
        body: dict[str, Any],
        spec: Any,
        warnings: list,
        group: Group | None,
        created: float,
        start_at: float,
        done_at: float,
        end: str,
        price: int,
    ):
        self.run_id, self.spec, self.warnings, self.group = run_id, spec, warnings or None, group
        self._body = json.dumps(
            {k: v for k, v in body.items() if k != "task_spec"}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        self.processor: str = body["processor"]
        self.created, self.start_at, self.done_at, self.end, self.price = created, start_at, done_at, end, price
        self.started = start_at <= created
        self.done = False
        self.error: dict[str, Any] | None = None
        self.created_s = ""  # formatted timestamps: strftime is the emulator's hot spot
        self.modified_s: tuple[float, str] | None = None
        self.seq = 0
        self.visible_at = 0.0  # eventual: when listings and events may show the run
        self.stale_s = 0.0  # eventual: how long listings keep showing it running after it ended
        self.action = 0  # action: 1 = stops in action_required instead of finishing, 2 = waiting there

    @property
    def body(self) -> dict[str, Any]:
        """The run's request body (input, processor, metadata, ...; the task spec is `spec`)."""
        return json.loads(self._body)

    @property
    def status(self) -> str:
        """queued, running (or action_required while waiting for an action), then the drawn ending:
        completed, failed or cancelled."""
        if self.done:
            return self.end
        if self.action == 2:
            return "action_required"
        return "running" if self.started else "queued"

    @property
    def active(self) -> bool:
        """The spec's is_active: queued, running or cancelling (action_required is not active)."""
        return not self.done and self.action != 2


class Group:
    __slots__ = (
        "changed",
        "counts",
        "created",
        "event_at",
        "events",
        "metadata",
        "modified",
        "pending",
        "runs",
        "taskgroup_id",
    )

    def __init__(self, taskgroup_id: str, metadata: Any, created: float):
        self.taskgroup_id, self.metadata, self.created, self.modified = taskgroup_id, metadata, created, created
        self.runs: list[Run] = []
        self.events: list[Run | None] = []  # run = task_run.state event; None = task_group_status event
        self.event_at: list[float] = []  # when each event was logged (expiry: its cursor's age)
        self.counts: Counter[str] = Counter()
        self.changed = asyncio.Event()
        self.pending = 0  # eventual: completion events waiting for their run to become visible

    def log(self, entry: Run | None, now: float) -> None:
        """Append one event to the group's event log."""
        self.events.append(entry)
        self.event_at.append(now)


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # "route kind" -> injected count
    creating_posts: int = 0
    runs_created: int = 0


class Emulator:
    """All state of one emulated account. Methods raise `Invalid(status, message)` for API errors."""

    def __init__(self, config: EmulatorConfig, knowledge: Knowledge | None = None):
        self.config = config
        self.knowledge = knowledge or Knowledge.load(config.knowledge, config.knowledge_key)
        self.faults = parse_faults(config.faults)
        self.behaviours = bh.parse_behaviours(config.behaviours)
        self.quality = (
            Quality(config.seed, config.hard_rate) if config.hard_rate > 0 or self.knowledge.tier_columns else None
        )
        self.endings = "endings" in self.behaviours
        self.eventual = "eventual" in self.behaviours
        self.vary_basis = "basis" in self.behaviours
        self.stops = "action" in self.behaviours
        self.echo = "echo" in self.behaviours
        self.expiry = "expiry" in self.behaviours
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------
    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.fault_rng = random.Random(self.config.seed + 1)
        self.brng = random.Random(self.config.seed + 2)  # behaviours only
        # ids like the real API's: unique across emulator processes and resets (a client that keeps a
        # journal across an emulator restart must never see a run id again), drawn apart from `rng` so
        # latencies and faults stay a function of the seed alone
        self.id_rng = random.Random(uuid.uuid4().int)
        self.runs: dict[str, Run] = {}
        self.groups: dict[str, Group] = {}
        self.ledger: list[Run] = []
        self._spec_cache: dict[int, tuple[Any, Any]] = {}
        self.starts: list[tuple[float, int, Run]] = []
        self.dones: list[tuple[float, int, Run]] = []
        self.reveals: list[tuple[float, int, Run]] = []  # eventual: completion events not yet visible
        self.tiebreak = 0
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.rate_windows: dict[str, deque[float]] = {}
        self.credit = None if self.config.credit_usd is None else round(self.config.credit_usd * 1_000_000)
        self.reserved = 0
        self.charged = 0
        self.active = 0
        self.stats = Stats()
        self.request_log: deque[tuple[float, str, str, int]] = deque(maxlen=200_000)  # (arrival, method, route, status)
        self.wake = asyncio.Event()
        self.mono0, self.wall0 = time.monotonic(), datetime.now(UTC)

    def stamp(self, mono: float) -> str:
        """RFC 3339 with microseconds and Z for a monotonic instant."""
        return (self.wall0 + timedelta(seconds=mono - self.mono0)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    # ---- time ------------------------------------------------------------------------
    def next_due(self) -> float | None:
        heads = [h[0][0] for h in (self.starts, self.dones, self.reveals) if h]
        return min(heads) if heads else None

    def advance(self, now: float | None = None) -> None:
        """Move every run whose start or completion instant has passed; wake its waiters."""
        now = time.monotonic() if now is None else now
        while self.starts and self.starts[0][0] <= now:
            run = heapq.heappop(self.starts)[2]
            run.started = True
            if run.group:
                run.group.counts["queued"] -= 1
                run.group.counts["running"] += 1
        touched: set[Group] = set()
        while self.dones and self.dones[0][0] <= now:
            run = heapq.heappop(self.dones)[2]
            self._finish(run, now)
            if run.group:
                touched.add(run.group)
        while self.reveals and self.reveals[0][0] <= now:
            run = heapq.heappop(self.reveals)[2]
            run.group.pending -= 1  # type: ignore[union-attr]
            run.group.log(run, now)  # type: ignore[union-attr]
            touched.add(run.group)  # type: ignore[arg-type]
        for group in touched:
            group.modified = now
            group.log(None, now)  # one coalesced task_group_status event per tick
            group.changed.set()
            group.changed = asyncio.Event()

    def _finish(self, run: Run, now: float) -> None:
        if run.action == 1:  # action: it stops here, not active, until act(); its credit stays reserved
            self._stop_for_action(run, now)
            return
        run.started = run.done = True
        self.active -= 1
        self.reserved -= run.price
        self.charged += run.price  # failed and cancelled runs are billed too: the work was done
        if run.end == "failed":
            why = "--behaviours endings" if self.endings and not self.config.fail_rate else "--fail-rate"
            run.error = {
                "ref_id": str(uuid.uuid4()),
                "message": f"The task run failed: emulated failure ({why}).",
                "detail": None,
            }
        if run.group:
            group = run.group
            group.counts["running"] -= 1
            group.counts[run.end] += 1
            if run.visible_at > now:  # eventual: the event waits until the run is visible
                group.pending += 1
                self.tiebreak += 1
                heapq.heappush(self.reveals, (run.visible_at, self.tiebreak, run))
            else:
                group.log(run, now)
        for fut in self.waiters.pop(run.run_id, ()):
            if not fut.done():
                fut.set_result(None)

    def _stop_for_action(self, run: Run, now: float) -> None:
        """action: the run becomes action_required (a transition to a non-active status: one event)."""
        run.started = True
        run.action = 2
        run.done_at = now
        if run.group:
            run.group.counts["running"] -= 1
            run.group.counts["action_required"] += 1
            run.group.log(run, now)

    def act(self, now: float | None = None) -> int:
        """The account owner acts: every run waiting in action_required resumes and finishes RESUME_S later."""
        now = time.monotonic() if now is None else now
        resumed = 0
        touched: set[Group] = set()
        for run in self.runs.values():
            if run.action != 2:
                continue
            run.action = 0
            run.done_at = now + bh.RESUME_S
            self.tiebreak += 1
            heapq.heappush(self.dones, (run.done_at, self.tiebreak, run))
            if run.group:
                run.group.counts["action_required"] -= 1
                run.group.counts["running"] += 1
                touched.add(run.group)
            resumed += 1
        for group in touched:
            group.modified = now
            group.log(None, now)
            group.changed.set()
            group.changed = asyncio.Event()
        self.wake.set()
        return resumed

    # ---- limits ----------------------------------------------------------------------
    def check_rate(self, key: str, now: float) -> float | None:
        """Count one creating POST for `key`; return seconds to wait if it is over the limit."""
        limit = self.config.rate_limit
        self.stats.creating_posts += 1
        if limit <= 0:
            return None
        window = self.rate_windows.setdefault(key, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= limit:
            return max(0.001, window[0] + 60 - now)
        window.append(now)
        return None

    def check_credit(self, price_total: int) -> None:
        if self.credit is not None and self.credit - self.charged - self.reserved < price_total:
            raise Invalid(402, "Insufficient credit: add credit or wait for active runs to finish.")

    def draw_fault(self) -> str | None:
        """Pick an injected fault for one request (seeded), or None."""
        if not self.faults:
            return None
        x = self.fault_rng.random()
        for kind in FAULT_KINDS:
            p = self.faults.get(kind, 0.0)
            if x < p:
                return kind
            x -= p
        return None

    # ---- creation --------------------------------------------------------------------
    def _new_run(
        self, body: dict[str, Any], spec: Any, warnings: list, group: Group | None, now: float, instant: bool = False
    ) -> Run:
        proc = PROCESSORS[body["processor"]]
        lo, hi = proc.latency_s
        latency = self.rng.uniform(lo, hi) * self.config.time_scale
        end = "failed" if self.config.fail_rate > 0 and self.rng.random() < self.config.fail_rate else "completed"
        if self.endings and end == "completed":
            x = self.brng.random()
            end = "failed" if x < bh.FAILED_P else "cancelled" if x < bh.FAILED_P + bh.CANCELLED_P else end
        if instant:
            latency = 0.0
        run_id = "trun_" + uuid.UUID(int=self.id_rng.getrandbits(128)).hex
        run = Run(run_id, body, spec, warnings, group, now, now + latency * 0.1, now + latency, end, proc.price_micros)
        if self.stops and end == "completed" and self.brng.random() < bh.ACTION_P:
            run.action = 1
        self.runs[run_id] = run
        self.active += 1
        self.reserved += run.price
        self.tiebreak += 1
        if not run.started:
            heapq.heappush(self.starts, (run.start_at, self.tiebreak, run))
        heapq.heappush(self.dones, (run.done_at, self.tiebreak, run))
        self.stats.runs_created += 1
        self.ledger.append(run)  # the entry is built when the ledger is read
        self.wake.set()
        return run

    def create_run(self, body: Any, now: float) -> Run:
        spec, warnings = validate_run_input(body)
        self.check_credit(PROCESSORS[body["processor"]].price_micros)
        return self._new_run(body, spec, warnings, None, now)

    def create_group(self, body: Any, now: float) -> Group:
        if body is not None and not isinstance(body, dict):
            raise Invalid(422, "request body must be a JSON object")
        metadata = (body or {}).get("metadata")
        from enrich.emulator.validate import validate_metadata

        validate_metadata(metadata)
        group = Group("tgrp_" + uuid.UUID(int=self.id_rng.getrandbits(128)).hex, metadata, now)
        self.groups[group.taskgroup_id] = group
        return group

    def get_group(self, taskgroup_id: str) -> Group:
        group = self.groups.get(taskgroup_id)
        if group is None:
            raise Invalid(404, "Task group not found")
        return group

    def add_runs(
        self, group: Group, body: Any, now: float, create: int | None = None
    ) -> tuple[list[Run], str | None, str | None]:
        """Validate every input first (all or nothing), then create the runs in input order (only the first
        `create` of them: the `lost` behaviour's partial creation)."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise Invalid(422, "'inputs' is required and must be a list", ["body", "inputs"])
        inputs = body["inputs"]
        if len(inputs) > MAX_GROUP_INPUTS:
            raise Invalid(422, f"at most {MAX_GROUP_INPUTS} inputs per request, got {len(inputs)}", ["body", "inputs"])
        default_spec = body.get("default_task_spec")
        checked = []
        for i, item in enumerate(inputs):
            try:
                spec, warnings = validate_run_input(item, default_spec)
            except Invalid as exc:
                exc.loc = ["body", "inputs", i, *exc.loc[1:]]
                raise
            checked.append((item, spec, warnings))
        checked = checked[:create] if create is not None else checked
        self.check_credit(sum(PROCESSORS[item["processor"]].price_micros for item, _, _ in checked))
        run_cursor = str(len(group.runs) - 1) if group.runs else None
        event_cursor = str(len(group.events) - 1) if group.events else None
        if self.eventual:
            return self._add_runs_eventually(group, checked, now), run_cursor, event_cursor
        runs = [self._new_run(item, spec, warnings, group, now) for item, spec, warnings in checked]
        self._append(group, runs, now)
        return runs, run_cursor, event_cursor

    @staticmethod
    def _append(group: Group, runs: list[Run], now: float) -> None:
        """Add new runs to their group in order, with one status event for the batch."""
        for run in runs:
            run.seq = len(group.runs)
            group.runs.append(run)
            group.counts[run.status] += 1
        group.modified = now
        if runs:
            group.log(None, now)
            group.changed.set()
            group.changed = asyncio.Event()

    def _add_runs_eventually(self, group: Group, checked: list, now: float) -> list[Run]:
        """add-runs under `eventual`: each run becomes visible up to VISIBLE_DELAY_S later, in
        input order (so cursors stay valid); EARLY_SHARE of the batch finishes at once and is
        visible at once (the app holds the reply so their events can go out first)."""
        rng = self.brng
        last = group.runs[-1].visible_at if group.runs else now
        delays = sorted(rng.uniform(0, bh.VISIBLE_DELAY_S) for _ in checked)
        runs = []
        for (item, spec, warnings), delay in zip(checked, delays, strict=True):
            early = rng.random() < bh.EARLY_SHARE
            run = self._new_run(item, spec, warnings, group, now, instant=early)
            last = max(last, now + delay)
            run.visible_at = now if early else last
            run.stale_s = rng.uniform(0, bh.STALE_S)
            runs.append(run)
        self._append(group, runs, now)
        return runs

    def visible_runs(self, group: Group, start: int, now: float) -> list[Run]:
        """The group's runs from `start` that a listing shows now (eventual: up to the first not yet visible)."""
        runs = group.runs[start:]
        if not self.eventual:
            return runs
        for i, run in enumerate(runs):
            if run.visible_at > now:
                return runs[:i]
        return runs

    def get_run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise Invalid(404, "Run id not found")
        return run

    def wait_for(self, run: Run) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(run.run_id, []).append(fut)
        return fut

    # ---- representations -------------------------------------------------------------
    def run_json(self, run: Run, bare: bool = False) -> dict[str, Any]:
        """The TaskRun object. Metadata is echoed (clients match results to rows by it), but with `bare`
        (nometa: /result and GET run) it is often absent or null, and under `echo` in other JSON types."""
        out = self._run_json(run)
        if self.echo:
            out["metadata"] = bh.echo_metadata(out["metadata"], run.seq)
        if bare and self.brng.random() < bh.NOMETA_P:
            if self.brng.random() < 0.5:
                del out["metadata"]
            else:
                out["metadata"] = None
        if run.action == 2:
            out["warnings"] = [*(out["warnings"] or []), {"type": "warning", "message": bh.ACTION_MESSAGE}]
        return bh.vary_run(out) if self.vary_basis else out

    def check_cursor(self, group: Group, position: int, runs: bool, now: float) -> None:
        """expiry: 422 for a cursor naming an event (or, on listings, a run) older than CURSOR_TTL_S."""
        if not self.expiry or position <= 0:
            return
        i = position - 1
        if runs:
            at = group.runs[i].created if i < len(group.runs) else now
        else:
            at = group.event_at[i] if i < len(group.event_at) else now
        if now - at > bh.CURSOR_TTL_S:
            raise Invalid(422, "last_event_id has expired", ["query", "last_event_id"])

    def _run_json(self, run: Run) -> dict[str, Any]:
        modified = run.done_at if run.done else (run.start_at if run.started else run.created)
        if not run.created_s:
            run.created_s = self.stamp(run.created)
        if run.modified_s is None or run.modified_s[0] != modified:
            run.modified_s = (modified, self.stamp(modified))
        return {
            "run_id": run.run_id,
            "interaction_id": run.run_id,
            "status": run.status,
            "is_active": run.active,
            "warnings": run.warnings or None,
            "error": run.error,
            "processor": run.processor,
            "metadata": run.body.get("metadata"),
            "taskgroup_id": run.group.taskgroup_id if run.group else None,
            "created_at": run.created_s,
            "modified_at": run.modified_s[1],
        }

    def output_json(self, run: Run) -> dict[str, Any]:
        """The run's output, generated on demand (deterministic): nothing per run is kept for it."""
        spec = self._normalized(run.spec)
        out = self.knowledge.answer(run.body["input"], spec, run.processor, self.quality)
        if self.vary_basis:
            out = bh.vary_output(out, random.Random(f"{self.config.seed}:{run.seq}:{run.processor}"))
        return out

    def _normalized(self, spec: Any) -> Any:
        """normalize_output_schema, memoised per spec object (runs of one batch share theirs)."""
        key = id(spec)
        hit = self._spec_cache.get(key)
        if hit is None or hit[0] is not spec:
            hit = (spec, normalize_output_schema(spec))
            if len(self._spec_cache) > 256:
                self._spec_cache.clear()
            self._spec_cache[key] = hit
        return hit[1]

    def group_status(self, group: Group) -> dict[str, Any]:
        counts = {k: v for k, v in group.counts.items() if v > 0}
        active = counts.get("queued", 0) + counts.get("running", 0)
        return {
            "num_task_runs": len(group.runs),
            "task_run_status_counts": counts,
            "is_active": active > 0,
            "status_message": None,
            "modified_at": self.stamp(group.modified),
        }

    def group_json(self, group: Group) -> dict[str, Any]:
        return {
            "taskgroup_id": group.taskgroup_id,
            "metadata": group.metadata,
            "status": self.group_status(group),
            "created_at": self.stamp(group.created),
        }

    def ledger_json(self) -> list[dict[str, Any]]:
        out = []
        for run in self.ledger:
            body = run.body
            out.append(
                {
                    "run_id": run.run_id,
                    "taskgroup_id": run.group.taskgroup_id if run.group else None,
                    "processor": run.processor,
                    "input": body["input"],
                    "metadata": body.get("metadata"),
                    "created_at": self.stamp(run.created),
                    "price": run.price / 1_000_000,
                    "price_micros": run.price,
                }
            )
        return out

    def stats_json(self) -> dict[str, Any]:
        by_route: dict[str, dict[str, int]] = {}
        for key, n in self.stats.requests.items():
            route, _, status = key.rpartition(" ")
            by_route.setdefault(route, {})[status] = n
        return {
            "requests": by_route,
            "total_requests": sum(self.stats.requests.values()),
            "behaviours": sorted(self.behaviours),
            "hard_rate": self.config.hard_rate,
            "faults_injected": dict(self.stats.faults),
            "creating_posts": self.stats.creating_posts,
            "runs_created": self.stats.runs_created,
            "active_runs": self.active,
            "credit_reserved_usd": self.reserved / 1e6,
            "credit_charged_usd": self.charged / 1e6,
        }
