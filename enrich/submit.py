"""Stage 2, submit: pending -> intent -> submitted, in add-runs batches of up to 1,000.

For each batch: reserve budget and commit `intent` (journal.claim), pace the creating POST
(aiolimiter: one POST per 60/requests_per_minute seconds, no initial burst), send it, and
commit the outcome. The failure class decides what happens to the rows (retry.py):

    TransientApiError  nothing was created: refund, back to pending with a backoff `next_at`
    OutcomeUnknown     runs may exist: `unknown`, settled by reconcile.py before any resend
    PermanentApiError  the batch was rejected (422): its rows are retried one by one, and a
                       row rejected alone is `failed`
    AuthError / PaymentRequired   refund, stop the whole job (exit 5)

Never more than `max_in_flight` runs are active, never above the budget (BudgetExceeded
stops submission; the rest stay pending and are reported `skipped_budget`), and a circuit
breaker stops creating runs during an outage, letting one probe through per cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from aiolimiter import AsyncLimiter

from enrich import failpoints
from enrich.client import TaskClient
from enrich.errors import (
    ApiError,
    AuthError,
    BudgetExceeded,
    OutcomeUnknown,
    PaymentRequired,
    PermanentApiError,
    TransientApiError,
)
from enrich.journal import Journal
from enrich.progress import JobState
from enrich.retry import CircuitBreaker, backoff

MAX_SLOWDOWN = 4.0
LINGER_S = 0.03


class Submitter:
    def __init__(self, journal: Journal, client: TaskClient, state: JobState, *, taskgroup_id: str, job_tag: str,
                 epoch: int, processor: str, price_micros: int, budget_micros: int | None, task_spec: dict[str, Any],
                 run_options: dict[str, Any], user_metadata: dict[str, Any] | None, max_in_flight: int,
                 batch_size: int, requests_per_minute: int, max_retries: int,
                 breaker: CircuitBreaker | None = None, rand: random.Random | None = None):
        self.journal, self.client, self.state = journal, client, state
        self.taskgroup_id, self.job_tag, self.epoch = taskgroup_id, job_tag, epoch
        self.processor, self.price, self.budget = processor, price_micros, budget_micros
        self.task_spec, self.run_options, self.user_metadata = task_spec, run_options, user_metadata or {}
        self.max_in_flight, self.batch_size, self.max_retries = max_in_flight, batch_size, max_retries
        self.base_period = 60.0 / requests_per_minute
        # aiolimiter paces creating POSTs at the configured rate with no initial burst
        # (AsyncLimiter(1, period) rather than AsyncLimiter(rate, 60)); `slowdown` stretches the
        # gap after 429s (AIMD, at most MAX_SLOWDOWN x) and `pause_until` honours Retry-After.
        self.limiter = AsyncLimiter(1, self.base_period)
        self.slowdown = 1.0
        self.pause_until = 0.0
        self.last_send = 0.0
        self.breaker = breaker or CircuitBreaker()
        self.rand = rand or random.Random()
        self.batch_seq = journal.get("batch_seq", 0)
        self.posts = 0

    def _input(self, row_ref: str, attempt: int, task_input: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"input": task_input, "processor": self.processor,
                                "metadata": {**self.user_metadata, "enrich_job": self.job_tag,
                                             "enrich_row": row_ref, "enrich_try": attempt}}
        body.update(self.run_options)
        return body

    async def _wait(self, seconds: float) -> None:
        """Sleep, but wake early on stop or when slots free up."""
        self.state.slots.clear()
        stop = asyncio.ensure_future(self.state.stop.wait())
        slots = asyncio.ensure_future(self.state.slots.wait())
        await asyncio.wait([stop, slots], timeout=max(seconds, 0.0), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        slots.cancel()

    def _throttle(self, retry_after: float | None) -> float:
        """On 429: pause every create until Retry-After (or a backoff) and slow the pace."""
        self.slowdown = min(self.slowdown * 1.5, MAX_SLOWDOWN)
        wait = retry_after if retry_after is not None else backoff(2, self.rand.random(), base=1.0)
        self.pause_until = max(self.pause_until, time.monotonic() + wait)
        return wait

    async def _pace(self) -> None:
        """Wait for the rate limiter, any Retry-After pause, and the AIMD slowdown (a stop cuts it short)."""
        await self.limiter.acquire()
        ready = max(self.pause_until, self.last_send + self.base_period * self.slowdown)
        while (left := ready - time.monotonic()) > 0 and not self.state.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.stop.wait(), left)
        self.last_send = time.monotonic()

    async def run(self) -> None:
        """Submit until nothing is pending, the budget is spent, the job stops, or auth fails."""
        try:
            await self._loop()
        finally:
            self.state.submitter_done = True
            self.state.new_runs.set()

    async def _loop(self) -> None:
        state, journal = self.state, self.journal
        while not state.stop.is_set():
            if self.breaker.state == "dead":
                return
            if self.breaker.state != "closed" and self.breaker.wait_time() > 0:
                await self._wait(min(self.breaker.wait_time(), 1.0))
                continue
            if self._free() <= 0:
                self.state.slots.clear()
                await self._wait(1.0)
                if not self.state.slots.is_set() and self._free() <= 0:
                    self._recount()   # a second without progress: trust the journal over the counters
                continue
            now = time.time()
            if not journal.has_pending(self.epoch, now):
                if not journal.has_pending(self.epoch):
                    state.resync(journal.in_flight_count(self.epoch))   # re-sync before deciding
                    if state.in_flight == 0 or not self._more_may_come():
                        return
                    await self._wait(1.0)   # rows in doubt may come back to pending after reconciliation
                    continue
                nxt = journal.next_retry_at(self.epoch) or now + 1
                await self._wait(min(nxt - now, 1.0))
                continue
            if not self.breaker.allow():
                await self._wait(min(max(self.breaker.wait_time(), 0.05), 1.0))
                continue
            await self._pace()            # take the rate slot first, so the batch is as full as it can be
            await self._linger()
            if state.stop.is_set():
                return
            free = self._free()
            if free <= 0:
                continue
            limit = min(self.batch_size, free) if self.breaker.state == "closed" else 1  # a probe is one run
            self.batch_seq += 1
            try:
                claimed = journal.claim(self.epoch, limit, self.price, self.budget, time.time(), self.batch_seq)
            except BudgetExceeded as exc:
                state.budget_exhausted = True
                journal.log("warning", str(exc))
                return
            if not claimed:
                continue
            state.in_flight += len(claimed)
            state.spent_micros = journal.spent_micros()
            failpoints.hit("after_intent_commit")
            await self._send(claimed)

    def _recount(self) -> None:
        """Drop released-run entries the journal has already recorded, and resync the in-flight count."""
        waiting = self.journal.submitted_ids(self.state.released)
        self.state.released.intersection_update(waiting)
        self.state.resync(self.journal.in_flight_count(self.epoch))

    def _free(self) -> int:
        """Slots for new runs: active runs stay under max_in_flight, and runs finished at the API but
        not yet recorded (their results still to fetch) are bounded too, so a fast API cannot make the
        backlog, and memory, grow with the input."""
        state = self.state
        backlog = state.in_flight + len(state.released)
        return min(self.max_in_flight - state.in_flight, self.max_in_flight + self.batch_size - backlog)

    async def _linger(self) -> None:
        """With few free slots and runs still active, wait briefly for more: fuller batches, fewer POSTs."""
        want = max(1, self.batch_size // 4)
        deadline = time.monotonic() + LINGER_S
        while self._free() < want and self.state.in_flight + len(self.state.released) > 0 \
                and not self.state.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self._wait(left)

    def _more_may_come(self) -> bool:
        """Rows in intent/unknown may be released back to pending by reconciliation."""
        return not self.state.reconcile_failed and bool(self.journal.unresolved())

    async def _send(self, claimed: list[Any]) -> None:
        state, journal = self.state, self.journal
        keys = [c.row_key for c in claimed]
        inputs = [self._input(c.row_ref, c.attempt, c.input) for c in claimed]
        self.posts += 1
        try:
            reply = await self.client.add_runs(self.taskgroup_id, inputs, self.task_spec)
        except (AuthError, PaymentRequired) as exc:
            journal.release(keys, time.time(), None, str(exc), self.max_retries, count_retry=False)
            state.freed(len(keys))
            self.breaker.trip_forever()
            journal.log("error", str(exc))
            state.fatal = exc
            state.stop.set()
            return
        except OutcomeUnknown as exc:
            failpoints.hit("after_response_before_commit")
            journal.mark_unknown(keys, str(exc))
            journal.log("error", str(exc))
            self.breaker.failure()
            state.unresolved.set()
            return
        except TransientApiError as exc:
            failpoints.hit("after_response_before_commit")
            wait = self._throttle(exc.retry_after) if exc.status == 429 else backoff(
                1 + self.breaker.failures, self.rand.random(), exc.retry_after)
            journal.release(keys, time.time(), time.time() + wait, str(exc), self.max_retries)
            journal.log("error", str(exc))
            state.freed(len(keys))
            if exc.status != 429:
                self.breaker.failure()
            return
        except PermanentApiError as exc:
            failpoints.hit("after_response_before_commit")
            if len(keys) > 1:   # find the bad row(s): resend each row alone
                journal.release(keys, time.time(), None, str(exc), self.max_retries, solo=True, count_retry=False)
            else:
                journal.fail_unsent(keys, time.time(), str(exc))
                state.failed += 1
            journal.log("error", str(exc))
            state.freed(len(keys))
            self.breaker.success()
            return
        except ApiError as exc:  # any other class is treated as "may have been created"
            journal.mark_unknown(keys, str(exc))
            state.unresolved.set()
            return
        failpoints.hit("after_response_before_commit")
        now = time.time()
        pairs = list(zip(keys, reply["run_ids"], strict=True))
        cursor = reply.get("run_cursor") or ""
        journal.mark_submitted(pairs, cursor, now)
        batch = self.batch_seq
        state.handoff.extend((run_id, key, batch, cursor, now) for key, run_id in pairs)
        self.breaker.success()
        self.slowdown = max(1.0, self.slowdown / 1.1)
        state.submitted += len(keys)
        state.new_runs.set()
