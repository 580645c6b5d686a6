"""The limits every partition of a job shares: the creating-POST rate and the budget.

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
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

from enrich.errors import JournalError
from enrich.files import atomic_json
from enrich.journal import Journal
from enrich.submit import Lease

STATE_FILE = "governor.json"


def journal_spend(path: Path) -> int:
    """Micro-dollars a partition journal has spent or reserved (0 if it does not exist yet)."""
    if not path.is_file():
        return 0
    try:
        view = Journal.open(path, readonly=True)
    except JournalError:
        return 0
    try:
        return view.spent_micros()
    finally:
        view.close()


def journal_pending(path: Path) -> dict[str, int]:
    """Pending rows per processor in a partition journal ({} if it does not exist yet)."""
    if not path.is_file():
        return {}
    try:
        view = Journal.open(path, readonly=True)
    except JournalError:
        return {}
    try:
        return view.pending_by_processor(view.get("epoch", 0))
    finally:
        view.close()


class GovernorState:
    """Global rate and budget bookkeeping for one job (see the module docstring)."""

    def __init__(
        self, parts_dir: str | Path, requests_per_minute: int, budget_micros: int | None, persist: bool = True
    ):
        self.parts_dir = Path(parts_dir)
        self.period = 60.0 / requests_per_minute
        self.budget = budget_micros
        self.persist = persist and budget_micros is not None
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
        if self.budget is None:
            return micros, "granted"
        free = self.budget - self.committed
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
        """Budget not allocated to any partition (None: no budget)."""
        return None if self.budget is None else self.budget - self.committed

    def snapshot(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "posts": self.posts,
            "budget_micros": self.budget,
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
