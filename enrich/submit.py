"""Stage 2, submit: pending -> intent -> submitted, in add-runs batches of up to 1,000.

For each batch: wait for free slots (slots.py), pace the creating POST (aiolimiter: one POST
per 60/requests_per_minute seconds, no initial burst), reserve budget and commit `intent`
(journal.claim), send it under a total deadline, and commit the outcome. The failure class
decides what happens to the rows (retry.py):

    TransientApiError  nothing was created: refund, back to pending with a backoff `next_at`;
                       it says nothing about the rows, so it never counts toward their attempts
                       (the job pauses instead: AIMD slowdown on 429, circuit breaker on outages)
    OutcomeUnknown     runs may exist: `unknown`, settled by reconcile.py before any resend
    PermanentApiError  the batch was rejected (422): its rows are retried one by one, and a
                       row rejected alone counts one rejection (the only error that counts against
                       a row); it is `failed` at the `max_attempts`-th and sent alone again before
    AuthError / PaymentRequired   refund, stop the whole job (exit 5)

The creating POST has a total deadline of `request_timeout_s` (connect + send + reply), and
config.py enforces `reconcile_grace_s` > that deadline: a row released as "never created" can
then not be created afterwards by a request still on its way. Rows whose POST is in flight are
listed in `state.posting`, and reconciliation leaves them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from aiolimiter import AsyncLimiter

from enrich import failpoints
from enrich.client import TaskClient
from enrich.errors import (
    ApiError,
    AuthError,
    BudgetExceeded,
    DailyBudgetExceeded,
    OutcomeUnknown,
    PaymentRequired,
    PermanentApiError,
    TransientApiError,
)
from enrich.journal import Claimed, Journal, Serve
from enrich.progress import JobState
from enrich.retry import CircuitBreaker, backoff
from enrich.runmeta import run_metadata

MAX_SLOWDOWN = 4.0
LINGER_S = 0.03


@dataclass(frozen=True)
class Lease:
    """A governor's answer: `granted` micro-dollars, and with none granted why (`verdict`, `message`):
    "spent" (the job's budget is used up), "wait" (what is left is kept for first-tier rows that
    partitions now running will claim: ask again soon), "defer" (it is kept for partitions not
    started yet: end this partition so they can run; it is run again afterwards)."""

    granted: int
    verdict: str = "granted"
    message: str = ""


class Governor(Protocol):
    """Limits shared by every partition of a job (scale-out): one is passed to each partition's run_job.

    `permit_post()` returns when this process may send one more creating POST (a global rate);
    `lease(micros, least=, first_tier=, need=)` asks for more global budget, at least `least` (one
    more run) or nothing, for a first-tier batch or an escalation step, saying how much this
    partition's pending first-tier rows still need. The partition's journal still reserves every
    run before sending, within what was leased."""

    async def permit_post(self) -> None: ...

    async def lease(self, micros: int, *, least: int, first_tier: bool, need: int) -> Lease: ...


class Submitter:
    def __init__(
        self,
        journal: Journal,
        client: TaskClient,
        state: JobState,
        *,
        taskgroup_id: str,
        job_tag: str,
        epoch: int,
        prices: dict[str, int],
        budget_micros: int | None,
        task_spec: dict[str, Any],
        run_options: dict[str, Any],
        user_metadata: dict[str, Any] | None,
        batch_size: int,
        requests_per_minute: int,
        request_timeout_s: float,
        max_retries: int,
        outage_give_up_s: float = 300.0,
        breaker: CircuitBreaker | None = None,
        rand: random.Random | None = None,
        governor: Governor | None = None,
        daily_budget_micros: int | None = None,
        first_tier: str | None = None,
        serve: Serve | None = None,
    ):
        self.journal, self.client, self.state = journal, client, state
        self.taskgroup_id, self.job_tag, self.epoch = taskgroup_id, job_tag, epoch
        self.prices, self.budget = prices, budget_micros
        self.task_spec, self.run_options, self.user_metadata = task_spec, run_options, user_metadata or {}
        self.batch_size, self.max_retries = batch_size, max_retries
        self.deadline_s, self.outage_give_up_s = request_timeout_s, outage_give_up_s
        self.base_period = 60.0 / requests_per_minute
        # aiolimiter paces creating POSTs at the configured rate with no initial burst
        # (AsyncLimiter(1, period) rather than AsyncLimiter(rate, 60)); `slowdown` stretches the
        # gap after 429s (AIMD, at most MAX_SLOWDOWN x) and `pause_until` honours Retry-After.
        self.limiter = AsyncLimiter(1, self.base_period)
        self.slowdown = 1.0
        self.pause_until = 0.0
        self.last_send = 0.0
        self.failing_since: float | None = None  # first creating request that failed since the API last answered
        self.breaker = breaker or CircuitBreaker()
        self.rand = rand or random.Random()
        self.batch_seq = journal.get("batch_seq", 0)
        self.governor = governor
        self.daily = daily_budget_micros
        self.leased = journal.spent_micros()  # with a governor: what this partition may have reserved
        self.first_tier = first_tier  # the ladder's first processor: its rows are leased for before any step
        self.serve = serve  # the shared cache's look-up, made in each claim (reuse.Reuse.serve)

    def _input(self, c: Claimed) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input": c.input,
            "processor": c.processor,
            "metadata": run_metadata(self.job_tag, c.row_ref, c.attempt, self.user_metadata),
        }
        body.update(self.run_options)
        return body

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.stop.wait(), max(seconds, 0.0))

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
        if (left := ready - time.monotonic()) > 0:
            await self._sleep(left)
        self.last_send = time.monotonic()

    def _free(self) -> int:
        return min(self.state.active.free, self.state.backlog.free)

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
            if self.failing_since is not None and time.monotonic() - self.failing_since > self.outage_give_up_s:
                state.unreachable = (
                    f"no creating request succeeded for {self.outage_give_up_s:.0f} s "
                    f"({journal.last_error() or 'API unreachable'})"
                )
                state.stop.set()
                return
            if self.breaker.state != "closed" and self.breaker.wait_time() > 0:
                state.waiting_on = "circuit breaker: the API is failing; waiting before a probe"
                await self._sleep(min(self.breaker.wait_time(), 1.0))
                continue
            if self._free() <= 0:
                state.waiting_on = "in-flight limit: waiting for runs to finish"
                await state.active.wait_free(1.0)
                await state.backlog.wait_free(1.0)
                continue
            now = time.time()
            if not journal.has_pending(self.epoch, now):
                if not journal.has_pending(self.epoch):
                    if journal.unstick(self.epoch):  # a row that waited for a twin no longer in flight
                        continue
                    if state.reconcile_failed or not journal.unresolved():
                        return
                    state.waiting_on = "rows in doubt: waiting for reconciliation"
                    await self._sleep(1.0)  # rows in doubt may come back to pending after reconciliation
                    continue
                nxt = journal.next_retry_at(self.epoch) or now + 1
                await self._sleep(min(nxt - now, 1.0))
                continue
            if not self.breaker.allow():
                await self._sleep(min(max(self.breaker.wait_time(), 0.05), 1.0))
                continue
            state.waiting_on = "rate limit: pacing creating requests"
            await self._pace()  # take the rate slot first, so the batch is as full as it can be
            await self._linger()
            if state.stop.is_set():
                return
            free = self._free()
            if free <= 0:
                continue
            limit = min(self.batch_size, free) if self.breaker.state == "closed" else 1  # a probe is one run
            budget = self.budget
            if self.governor is not None:
                refused = await self._lease(limit)
                if refused is not None and refused.verdict in ("wait", "backoff"):
                    state.waiting_on = refused.message
                    until = journal.next_retry_at(self.epoch) if refused.verdict == "backoff" else None
                    await self._sleep(min(max((until or time.time() + 0.5) - time.time(), 0.05), 1.0))
                    continue
                if refused is not None:  # spent, or kept for partitions that have not started yet (defer)
                    state.budget_exhausted = True
                    state.budget_deferred = refused.verdict == "defer"
                    state.budget_message = refused.message
                    journal.log("warning", refused.message)
                    return
                await self.governor.permit_post()
                budget = self.leased if self.budget is None else min(self.leased, self.budget)
            self.batch_seq += 1
            try:
                claimed = journal.claim(
                    self.epoch,
                    limit,
                    self.prices,
                    budget,
                    time.time(),
                    self.batch_seq,
                    daily_budget=self.daily,
                    serve=self.serve,
                )
                state.reused = journal.reused_moves
            except BudgetExceeded as exc:
                state.budget_exhausted = True
                state.budget_message = (
                    str(exc)
                    if self.governor is None or isinstance(exc, DailyBudgetExceeded)
                    else f"budget reached: this partition's share of the job's budget ({self.leased / 1e6:.4f} USD) "
                    "is spent or reserved"
                )
                journal.log("warning", state.budget_message)
                return
            if not claimed:  # what is left of the budget is kept for cheaper rows still in backoff
                state.waiting_on = "budget kept for first-tier rows waiting out a backoff"
                nxt = journal.next_retry_at(self.epoch) or time.time() + 1
                await self._sleep(min(max(nxt - time.time(), 0.05), 1.0))
                continue
            state.active.take(len(claimed))
            state.backlog.take(len(claimed))
            state.spent_micros = journal.spent_micros()
            failpoints.hit("after_intent_commit")
            state.waiting_on = ""
            await self._send(claimed)

    async def _lease(self, limit: int) -> Lease | None:
        """Top up the global lease so the batch the claim takes next fits; None when the claim may go ahead,
        else why not (the governor's answer, or "backoff": this partition's cheaper rows come first)."""
        assert self.governor is not None
        journal = self.journal
        nxt = journal.next_batch(self.epoch, time.time(), limit, self.prices)
        if nxt is None:
            return None  # nothing ready: the claim finds nothing either
        processor, n, cheapest = nxt
        if not cheapest:
            return Lease(0, "backoff", "rows of a cheaper processor wait out a backoff: they are sent first")
        price = self.prices[processor]
        surplus = self.leased - journal.spent_micros()
        if surplus >= n * price:
            return None
        base = self.first_tier or processor
        need = max(0, journal.pending_count(self.epoch, base) * self.prices[base] - surplus)  # what the lease lacks
        lease = await self.governor.lease(
            n * price - surplus, least=max(1, price - surplus), first_tier=processor == base, need=need
        )
        self.leased += lease.granted
        return None if lease.granted or surplus >= price else lease

    async def _linger(self) -> None:
        """With few free slots and runs still active, wait briefly for more: fuller batches, fewer POSTs."""
        want = max(1, self.batch_size // 4)
        deadline = time.monotonic() + LINGER_S
        while self._free() < want and self.state.backlog.used > 0 and not self.state.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self.state.backlog.wait_change(left)

    def _failed(self) -> None:
        """A creating request failed in a way that says nothing about its rows (outage, lost reply)."""
        self.breaker.failure()
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def _answered(self) -> None:
        self.breaker.success()
        self.failing_since = None

    def _give(self, n: int) -> None:
        self.state.active.give(n)
        self.state.backlog.give(n)

    async def _post(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """The creating POST under its total deadline; running out of time is an unknown outcome."""
        try:
            async with asyncio.timeout(self.deadline_s):
                return await self.client.add_runs(self.taskgroup_id, inputs, self.task_spec)
        except TimeoutError:
            raise OutcomeUnknown(f"add runs: no complete reply within the {self.deadline_s:g} s deadline") from None

    async def _send(self, claimed: list[Claimed]) -> None:
        state, journal = self.state, self.journal
        rows = [(c.row_key, c.attempt) for c in claimed]
        keys = [c.row_key for c in claimed]
        inputs = [self._input(c) for c in claimed]
        state.posting.update(keys)
        try:
            reply = await self._post(inputs)
        except (AuthError, PaymentRequired) as exc:
            journal.release(rows, time.time(), None, str(exc), self.max_retries)
            self._give(len(rows))
            self.breaker.trip_forever()
            journal.log("error", str(exc))
            state.fatal = exc
            state.stop.set()
            return
        except OutcomeUnknown as exc:
            failpoints.hit("after_response_before_commit")
            journal.mark_unknown(rows, str(exc))
            journal.log("error", str(exc))
            self._failed()
            state.unresolved.set()
            return
        except TransientApiError as exc:
            failpoints.hit("after_response_before_commit")
            wait = (
                self._throttle(exc.retry_after)
                if exc.status == 429
                else backoff(1 + self.breaker.failures, self.rand.random(), exc.retry_after)
            )
            journal.release(rows, time.time(), time.time() + wait, str(exc), self.max_retries)
            journal.log("error", str(exc))
            self._give(len(rows))
            if exc.status == 429:
                self.failing_since = None  # the API answered: rate limiting is not an outage
            else:
                self._failed()
            return
        except PermanentApiError as exc:
            failpoints.hit("after_response_before_commit")
            if len(rows) > 1:  # find the bad row(s): resend each row alone
                journal.release(rows, time.time(), None, str(exc), self.max_retries, solo=True)
            else:  # rejected alone: the row itself is refused; failed after limits.max_attempts such rejections
                if journal.release(rows, time.time(), None, str(exc), self.max_retries, count_retry=True):
                    state.failed += 1
            journal.log("error", str(exc))
            self._give(len(rows))
            self._answered()
            return
        except ApiError as exc:  # any other class is treated as "may have been created"
            journal.mark_unknown(rows, str(exc))
            state.unresolved.set()
            return
        finally:
            state.posting.difference_update(keys)
        failpoints.hit("after_response_before_commit")
        now = time.time()
        cursor = reply.get("run_cursor") or ""
        run_ids = list(reply["run_ids"])
        journal.mark_submitted(rows, run_ids, self.batch_seq, cursor, now)
        state.handoff.extend((run_id, self.batch_seq, cursor, now) for run_id in run_ids)
        self._answered()
        self.slowdown = max(1.0, self.slowdown / 1.1)
        state.submitted += len(rows)
        state.new_runs.set()
