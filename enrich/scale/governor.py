"""The limits every partition of a job shares: the creating-POST rate and the budget.

`GovernorState` is the logic (no Ray, unit-testable); runner.py wraps it in one named async
Ray actor per job, and `ActorGovernor` is the worker-side adapter that implements the
Submitter's `Governor` protocol (submit.py) by calling that actor.

Rate: one creating POST per 60/requests_per_minute seconds across all partitions, handed out
in order with no burst (the single-machine pacing, made global). Budget: each partition holds
an allocation, the money it may have reserved in its journal (spent + leased, not yet spent);
a lease grows it while the sum over partitions stays within `limits.budget_usd`. A partition
that finishes settles its allocation down to what its journal spent.

Durability: the partition journals are the truth. A restarted actor rebuilds each allocation
as max(what the partition's journal spent, the last allocation it persisted to
`<parts>/governor.json`), so it never believes less is committed than really is: a crash can
only make it grant less, never overspend. A partition (re)starting registers its journal's
spend as its allocation, which releases what a dead attempt of it had leased but not used.
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
        self.rebuild()

    def rebuild(self) -> None:
        """Allocations from the partition journals and the last persisted state (the larger of the two)."""
        saved: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            saved = {k: int(v) for k, v in json.loads((self.parts_dir / STATE_FILE).read_text())["alloc"].items()}
        names = {p.name.removesuffix(".sqlite") for p in self.parts_dir.glob("part-*.sqlite")} | set(saved)
        self.alloc = {n: max(journal_spend(self.parts_dir / f"{n}.sqlite"), saved.get(n, 0)) for n in sorted(names)}

    def _save(self) -> None:
        if not self.persist:
            return
        atomic_json(self.parts_dir / STATE_FILE, {"alloc": self.alloc, "budget_micros": self.budget})

    @property
    def committed(self) -> int:
        return sum(self.alloc.values())

    def post_delay(self, now: float) -> float:
        """Take the next creating-POST slot; returns how long to wait for it (seconds)."""
        at = max(now, self.next_at)
        self.next_at = at + self.period
        self.posts += 1
        return at - now

    def register(self, part: str, baseline: int) -> None:
        """A partition starts: its allocation is what its journal holds (a dead attempt's lease is freed)."""
        self.alloc[part] = baseline
        self._save()

    def lease(self, part: str, micros: int, held: int) -> int:
        """Grant up to `micros` more to `part`, which says it holds `held`; 0 when the budget is used up."""
        if held > self.alloc.get(part, 0):  # a restarted governor learns what a live partition holds
            self.alloc[part] = held
        room = micros if self.budget is None else self.budget - self.committed
        grant = max(0, min(micros, room))
        if grant:
            self.alloc[part] = self.alloc.get(part, 0) + grant
            self._save()
        return grant

    def settle(self, part: str, spent: int) -> None:
        """A partition finished: its allocation shrinks to what its journal spent."""
        self.alloc[part] = spent
        self._save()

    def snapshot(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "posts": self.posts,
            "budget_micros": self.budget,
            "committed_micros": self.committed,
            "alloc": dict(self.alloc),
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

    async def lease(self, micros: int) -> int:
        ask = micros if self.max_ask is None else min(micros, self.max_ask)
        grant = int(await self.actor.lease.remote(self.part, ask, self.held))
        self.held += grant
        return grant
