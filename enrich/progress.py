"""Shared live state of one job (counters the stages update) and its display on stderr.

tqdm draws a bar when stderr is a terminal; otherwise (cron, CI, `make nightly` into a log)
a plain status line is logged every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

from enrich.processors import usd
from enrich.slots import Slots


class Stop:
    """The one way a job is told to stop, whoever asks.

    The job's own stages call `set()` (a fatal error, the end of the work) on its event loop. From
    outside, `interrupt()` may be called from any thread: the CLI's signal handlers, the thread that
    waits on a job running on a worker thread when a KeyboardInterrupt reaches it (Ctrl-C in a script,
    a Jupyter kernel interrupt, `ray.cancel` of a partition). The first interrupt stops submitting at
    once: requests in flight finish and are recorded, then the output is written. A further one also
    cancels the job's task (requests in flight are abandoned; their rows are settled on the next run).
    The stages wait on it with `wait()` and test it with `is_set()`, on the job's loop.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[object] | None = None
        self.interrupts = 0  # how many times the job was interrupted from outside

    @property
    def interrupted(self) -> bool:
        return self.interrupts > 0

    @property
    def started(self) -> bool:
        """True once the job's event loop has bound this Stop (work has begun)."""
        return self._loop is not None

    def bind(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object] | None = None) -> None:
        """Called by the job on its loop as it starts; an interrupt that came earlier takes effect now."""
        self._loop, self._task = loop, task
        if self.interrupts:  # written before `interrupt` reads the loop: one of the two always sets the event
            self._event.set()

    def interrupt(self) -> int:
        """Ask the job to stop, from any thread; returns how many times it has been asked."""
        self.interrupts += 1
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the job is already over
                loop.call_soon_threadsafe(self._event.set)
                if self.interrupts > 1 and self._task is not None:
                    loop.call_soon_threadsafe(self._task.cancel)
        return self.interrupts

    def set(self) -> None:
        """Stop from within the job (on its loop)."""
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class JobState:
    """Counters and wake-ups shared by submit, poll and reconcile within one process.

    Runs in flight are owned by two `Slots` (slots.py): `active` (the API is working on them) and
    `backlog` (not yet recorded). The counters below are for display and the run report only.
    """

    total: int = 0
    done_before: int = 0  # rows already finished when this invocation started
    submitted: int = 0  # runs created by this invocation
    completed: int = 0
    failed: int = 0
    spent_micros: int = 0
    submitter_done: bool = False
    budget_exhausted: bool = False
    budget_message: str = ""  # which budget ran out (job or daily), and when a daily one resets
    budget_deferred: bool = False  # a partition made way: the rest of the job's budget is kept for others' first tier
    escalated: int = 0  # rows moved up the processor ladder by this invocation
    reused: int = 0  # rows given an outcome without a run of their own (a twin's run, the shared cache)
    requests: int = 0  # HTTP requests made by this invocation
    reconcile_failed: bool = False  # the group could not be listed: rows in doubt stay unknown this run
    unreachable: str | None = None  # the API could not be reached for long: why the job stopped
    fatal: BaseException | None = None
    waiting_on: str = ""  # what the job is waiting for right now (shown by `enrich status`)
    active: Slots = field(default_factory=lambda: Slots(1))
    backlog: Slots = field(default_factory=lambda: Slots(1))
    stop: Stop = field(default_factory=Stop)  # the one owner of "stop the job" (see Stop)
    new_runs: asyncio.Event = field(default_factory=asyncio.Event)  # runs were submitted or adopted
    unresolved: asyncio.Event = field(default_factory=asyncio.Event)  # rows need reconciliation
    handoff: list[tuple[str, int, str, float]] = field(default_factory=list)  # new runs for the poller
    reload_runs: bool = False  # reconciliation adopted runs: the poller re-reads the journal
    posting: set[str] = field(default_factory=set)  # row keys whose creating POST is in flight
    started: float = field(default_factory=time.monotonic)

    @property
    def in_flight(self) -> int:
        return self.backlog.used

    def finished_rows(self) -> int:
        """Rows finished so far: a row that climbs the ladder is unfinished again until its next run ends."""
        return max(0, min(self.total, self.done_before + self.completed + self.failed + self.reused - self.escalated))


async def show_progress(state: JobState, interval_s: float = 5.0) -> None:
    """Refresh a tqdm bar (TTY) or log a status line every `interval_s` (non-TTY) until cancelled.

    A stderr that is missing or cannot be written (closed, a pipe nobody reads) ends the display,
    never the job."""
    try:
        await _show_progress(state, interval_s)
    except (OSError, ValueError, AttributeError):
        return


async def _show_progress(state: JobState, interval_s: float) -> None:
    tty = sys.stderr.isatty() or "ipykernel" in sys.modules  # a notebook shows a widget
    bar = tqdm(
        total=state.total,
        initial=state.done_before,
        unit="row",
        file=sys.stderr,
        disable=not tty,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    last_log = 0.0
    try:
        while True:
            done = state.finished_rows()
            bar.n = done
            bar.set_postfix_str(
                f"submitted {state.submitted} in-flight {state.in_flight} failed {state.failed} "
                f"spent {usd(state.spent_micros)}",
                refresh=False,
            )
            bar.refresh()
            now = time.monotonic()
            if not tty and now - last_log >= interval_s:
                last_log = now
                rate = state.completed / max(now - state.started, 1e-9)
                left = state.total - done
                eta = f"{max(left, 0) / rate:.0f}s" if rate > 0 else "?"
                climbing = f" ({state.escalated} climbed the ladder)" if state.escalated else ""
                print(
                    f"enrich: {done}/{state.total} rows finished{climbing}, {state.in_flight} in flight, "
                    f"{state.failed} failed, spent {usd(state.spent_micros)}, ETA {eta}",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(0.5 if tty else 1.0)
    finally:
        bar.n = state.finished_rows()
        bar.close()
