"""The limits every partition of a job shares: the creating-POST rate, the budget and the daily budget.

`GovernorState` is the logic (no Ray, unit-testable); runner.py wraps it in one named async
Ray actor per job, and `ActorGovernor` is the worker-side adapter that implements the
Submitter's `Governor` protocol (submit.py) by calling that actor.

Rate: one creating POST per 60/requests_per_minute seconds across all partitions, handed out
in order with no burst (the single-machine pacing, made global). Budget: each partition holds
an allocation, the money it may have reserved in its journal (spent + leased, not yet spent);
a lease grows it while the sum over partitions stays within `limits.budget_usd`. A partition
that finishes settles its allocation down to what its journal spent, so a lease it did not use
comes back.

First tier first, across partitions: every partition's first-tier work is covered before any
escalation step is paid anywhere. Each partition has a `need`, the first-tier money it has yet
to reserve: the driver expects it before the partition starts (an upper bound from its journal
or its row count), the partition reports it with every lease, and settling records what it
left undone. A first-tier lease may take any money not allocated; an escalation lease only what
is left after every partition's need. An escalation lease that cannot be granted is answered
`wait` when every partition with a need is running (their needs shrink as they lease), `defer`
when one is not running yet (the asking partition ends, so a queued one can start; the driver
runs it again afterwards), `spent` when not even one run fits.

Durability: the partition journals are the truth. A restarted actor rebuilds each allocation
as max(what the partition's journal spent, the last allocation it persisted to
`<parts>/governor.json`), so it never believes less is committed than really is: a crash can
only make it grant less, never overspend. Needs are persisted with the allocations. A partition
(re)starting registers its journal's spend as its allocation, which releases what a dead
attempt of it had leased but not used.

Daily budget (`limits.daily_budget_usd`): the governor owns it for the whole job, so partitions on
different nodes never share one SQLite spend ledger (not safe on a network file system) and never
count it each in their own journal (which would give every partition the whole day). When the job
starts, the driver takes a day lease (`open_day`): what is left of today's (UTC) daily budget after
this job's own reservations today and, with `limits.spend_ledger`, the other jobs' entries there; it
records that lease in the ledger at once (other jobs on the host see the money as reserved) and the
governor caps the job's commitments at what the partitions had committed plus the lease. When the job
ends, `close_day` records in the ledger what the partitions really reserved that day (the unused lease
comes back). A driver killed in between leaves its lease reserved until the next run settles it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from enrich.config import RunConfig
from enrich.errors import JournalError
from enrich.files import atomic_json
from enrich.journal import Journal
from enrich.spend import daily_message, utc_day
from enrich.submit import Lease

STATE_FILE = "governor.json"
T = TypeVar("T")


def _read(path: Path, read: Callable[[Journal], T], empty: T) -> T:
    """`read` on a read-only view of a partition journal; `empty` when it does not exist yet (or cannot be read)."""
    if not path.is_file():
        return empty
    try:
        view = Journal.open(path, readonly=True)
    except JournalError:
        return empty
    try:
        return read(view)
    finally:
        view.close()


def journal_spend(path: Path) -> int:
    """Micro-dollars a partition journal has spent or reserved (0 if it does not exist yet)."""
    return _read(path, Journal.spent_micros, 0)


def journal_paid_by_processor(path: Path) -> dict[str | None, tuple[int, int]]:
    """processor -> (runs, micro-dollars) a partition journal paid or reserved (Journal.paid_by_processor; empty if
    it does not exist yet)."""
    return _read(path, Journal.paid_by_processor, {})


def journal_reserved_on(path: Path, day: str) -> int:
    """Micro-dollars a partition journal reserved on UTC `day` (0 if it does not exist yet)."""
    return _read(path, lambda view: view.reserved_on_day(day), 0)


def journal_pending(path: Path) -> dict[str, int]:
    """Pending rows per processor in a partition journal ({} if it does not exist yet)."""
    return _read(path, lambda view: view.pending_by_processor(view.get("epoch", 0)), {})


class GovernorState:
    """Global rate and budget bookkeeping for one job (see the module docstring)."""

    def __init__(
        self,
        parts_dir: str | Path,
        requests_per_minute: int,
        budget_micros: int | None,
        persist: bool = True,
        daily: tuple[int, int] | None = None,
    ):
        """`daily` is (the daily budget, the most the job may have committed in all today): a `DayLease`'s."""
        self.parts_dir = Path(parts_dir)
        self.period = 60.0 / requests_per_minute
        self.budget = budget_micros
        self.daily_budget: int | None = daily[0] if daily is not None else None
        self.daily_ceiling: int | None = daily[1] if daily is not None else None
        self.persist = persist and (budget_micros is not None or daily is not None)
        self.next_at = 0.0
        self.posts = 0
        self.incarnation = uuid.uuid4().hex
        self.alloc: dict[str, int] = {}
        self.need: dict[str, int] = {}  # first-tier micros each partition has yet to reserve
        self.running: set[str] = set()
        self.rebuild()

    def rebuild(self) -> None:
        """Allocations from the partition journals and the last persisted state (the larger of the two)."""
        saved: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads((self.parts_dir / STATE_FILE).read_text())
            saved = {k: int(v) for k, v in data["alloc"].items()}
            self.need = {k: int(v) for k, v in data.get("need", {}).items()}
        names = {p.name.removesuffix(".sqlite") for p in self.parts_dir.glob("part-*.sqlite")} | set(saved)
        self.alloc = {n: max(journal_spend(self.parts_dir / f"{n}.sqlite"), saved.get(n, 0)) for n in sorted(names)}

    def _save(self) -> None:
        if not self.persist:
            return
        atomic_json(self.parts_dir / STATE_FILE, {"alloc": self.alloc, "need": self.need, "budget_micros": self.budget})

    @property
    def committed(self) -> int:
        return sum(self.alloc.values())

    @property
    def ceiling(self) -> int | None:
        """The most every partition together may have committed: the job's budget or the day's, the lower."""
        caps = [c for c in (self.budget, self.daily_ceiling) if c is not None]
        return min(caps) if caps else None

    def _daily_binds(self) -> bool:
        return self.daily_ceiling is not None and (self.budget is None or self.daily_ceiling < self.budget)

    def post_delay(self, now: float) -> float:
        """Take the next creating-POST slot; returns how long to wait for it (seconds)."""
        at = max(now, self.next_at)
        self.next_at = at + self.period
        self.posts += 1
        return at - now

    def expect(self, part: str, need: int) -> None:
        """The driver is about to queue `part`: keep `need` (first-tier micros, an upper bound) for it."""
        self.need[part] = need
        self._save()

    def register(self, part: str, baseline: int) -> None:
        """A partition starts: its allocation is what its journal holds (a dead attempt's lease is freed)."""
        self.alloc[part] = baseline
        self.running.add(part)
        self._save()

    def lease(
        self, part: str, micros: int, held: int, least: int = 1, first_tier: bool = True, need: int | None = None
    ) -> tuple[int, str]:
        """Grant `part` up to `micros` more, and at least `least` (what one more run needs) or nothing.
        The partition says it holds `held` and still needs `need` for its first-tier rows.

        Returns (granted, verdict): "granted", or with nothing granted "wait", "defer" or "spent"
        (see the module docstring)."""
        if held > self.alloc.get(part, 0):  # a restarted governor learns what a live partition holds
            self.alloc[part] = held
        self.running.add(part)
        if need is not None:
            self.need[part] = need
        ceiling = self.ceiling
        if ceiling is None:
            return micros, "granted"
        free = ceiling - self.committed
        room = free if first_tier else free - sum(self.need.values())
        grant = min(micros, room)
        if grant >= least:
            self.alloc[part] = self.alloc.get(part, 0) + grant
            if first_tier and part in self.need:
                self.need[part] = max(0, self.need[part] - grant)
            self._save()
            return grant, "granted"
        if first_tier or free < least:
            return 0, "spent"
        # the money left is kept for first-tier rows: wait while their partitions run, else make way for them
        needy = [p for p, n in self.need.items() if n > 0]
        return 0, "wait" if all(p in self.running for p in needy) else "defer"

    def explain(self, verdict: str) -> str:
        """One line for a lease answered without money."""
        budget, committed = (self.budget or 0) / 1e6, self.committed / 1e6
        if self._daily_binds() and self.daily_budget is not None and self.daily_ceiling is not None:
            left = max(0, self.daily_ceiling - self.committed)
            if verdict == "spent":
                return daily_message(self.daily_budget - left, self.daily_budget, time.time())
            return (
                f"daily budget: the {left / 1e6:.4f} USD left today is kept for first-tier rows of other "
                "partitions; escalation steps come after them"
            )
        if verdict == "spent":
            return (
                f"budget reached: {committed:.4f} USD of the job's {budget:.4f} USD spent or reserved across partitions"
            )
        return (
            f"budget: the {budget - committed:.4f} USD left of the job's {budget:.4f} USD is kept for first-tier "
            "rows of other partitions; escalation steps come after them"
        )

    def settle(self, part: str, spent: int, need: int = 0) -> None:
        """A partition finished: its allocation shrinks to what its journal spent; `need` is the first-tier
        money its undone rows would still take (kept for them: escalation elsewhere comes after)."""
        self.alloc[part] = spent
        self.need[part] = need
        self.running.discard(part)
        self._save()

    def free(self) -> int | None:
        """Budget (the job's or the day's, the lower) not allocated to any partition (None: no budget)."""
        ceiling = self.ceiling
        return None if ceiling is None else ceiling - self.committed

    def snapshot(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "posts": self.posts,
            "budget_micros": self.budget,
            "daily_budget_micros": self.daily_budget,
            "daily_ceiling_micros": self.daily_ceiling,
            "committed_micros": self.committed,
            "alloc": dict(self.alloc),
            "need": dict(self.need),
            "running": sorted(self.running),
            "requests_per_minute": 60.0 / self.period,
        }


class ActorGovernor:
    """The Submitter's `Governor` (submit.py) for one partition, backed by the job's governor actor.

    Asks are capped at one batch of the partition's dearest processor, so one partition never
    takes the whole budget for runs it will not send soon; `held` goes with every lease so a
    restarted actor learns this partition's allocation at once."""

    def __init__(self, actor: Any, part: str, baseline: int, max_ask: int | None = None):
        self.actor, self.part, self.held, self.max_ask = actor, part, baseline, max_ask
        self.posts = 0

    async def permit_post(self) -> None:
        await self.actor.permit_post.remote()
        self.posts += 1

    async def lease(self, micros: int, *, least: int, first_tier: bool, need: int) -> Lease:
        ask = micros if self.max_ask is None else min(micros, self.max_ask)
        grant, verdict, message = await self.actor.lease.remote(self.part, ask, self.held, least, first_tier, need)
        self.held += int(grant)
        return Lease(int(grant), verdict, message)


@dataclass(frozen=True)
class DayLease:
    """What `open_day` took for a job run on Ray: the UTC `day`, the daily `budget` (None: none), the most
    the partitions may have committed in all (`ceiling`, None: no daily budget), and the ledger it is in."""

    day: str
    budget: int | None
    ceiling: int | None
    ledger: Path | None
    job: str


def _ledger(path: Path, job: str) -> Journal:
    view = Journal.open(":memory:")
    view.attach_ledger(path, job)
    return view


def open_day(cfg: RunConfig, job: str, journals: list[Path], now: float) -> DayLease | None:
    """The job's day lease, taken before any partition runs (see the module docstring); None when the job
    has neither a daily budget nor a spend ledger. `job` names the job in the ledger."""
    daily, ledger = cfg.limits.daily_budget_micros, cfg.limits.spend_ledger
    if daily is None and ledger is None:
        return None
    day = utc_day(now)
    mine = sum(journal_reserved_on(p, day) for p in journals)
    committed = sum(journal_spend(p) for p in journals)
    cap = None if cfg.budget_micros is None else max(0, cfg.budget_micros - committed)
    if ledger is not None:
        view = _ledger(ledger, job)
        try:
            lease = view.day_lease(day, mine, daily, cap)
        finally:
            view.close()
    else:
        lease = 0 if daily is None else max(0, daily - mine)
    return DayLease(day, daily, None if daily is None else committed + lease, ledger, job)


def close_day(lease: DayLease | None, journals: list[Path], now: float) -> None:
    """Record in the ledger what the partitions really reserved on the lease's day (and today, if the job
    ran past midnight): the lease they did not use comes back to the other jobs."""
    if lease is None or lease.ledger is None:
        return
    view = _ledger(lease.ledger, lease.job)
    try:
        for day in dict.fromkeys([lease.day, utc_day(now)]):
            view.day_settle(day, sum(journal_reserved_on(p, day) for p in journals))
    finally:
        view.close()
