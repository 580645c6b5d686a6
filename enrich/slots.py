"""One owner for a count several tasks change: free slots of runs in flight.

Two are used per job (progress.JobState): `active` bounds runs the API is still working on
(given back when the API says a run ended), `backlog` bounds runs not yet recorded in the
journal (given back when the result is stored), so a fast API cannot make memory grow with the
input. Nothing else writes these numbers, so nothing ever has to "resync" them from storage.
"""

from __future__ import annotations

import asyncio


class Slots:
    """A counting semaphore that can be taken in bulk, given back from sync code, and pre-loaded.

    >>> s = Slots(3); s.preload(2); s.free
    1
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._cond = asyncio.Condition()
        self._waiters = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def preload(self, n: int) -> None:
        """Count runs already in flight when the job (re)starts; may exceed the capacity."""
        self.used += n

    def take(self, n: int) -> None:
        """Take exactly `n` (the caller checked `free` in the same step of the event loop)."""
        if n > self.free:
            raise RuntimeError(f"Slots.take({n}) with only {self.free} free")
        self.used += n

    def give(self, n: int = 1) -> None:
        """Give back `n` slots and wake waiters; giving back more than was taken is a bug."""
        if n <= 0:
            return
        if n > self.used:
            raise RuntimeError(f"Slots.give({n}) with only {self.used} taken")
        self.used -= n
        if self._waiters:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_free(self, timeout: float) -> bool:
        """Wait until a slot is free (or `timeout`); True if one is."""
        if self.free > 0:
            return True
        self._waiters += 1
        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.free > 0), timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1
        return True

    async def wait_change(self, timeout: float) -> None:
        """Wait until something is given back (or `timeout`)."""
        self._waiters += 1
        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait(), timeout)
        except TimeoutError:
            return
        finally:
            self._waiters -= 1
