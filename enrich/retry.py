"""Retry rules, in one place and pure (no clock, no randomness, no I/O inside).

- `classify_status` / `classify_failure` map every HTTP status and every transport failure
  to exactly one class of the error tree, per reliability.md section 4: a creating POST that
  may have reached the server is `OutcomeUnknown` (reconcile, never blindly resend); a GET is
  always safe to retry.
- `backoff` is exponential with full jitter, honouring a server's Retry-After.
- `CircuitBreaker` stops creating runs during an outage and lets one probe through per cooldown.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping

from enrich.errors import (
    ApiError,
    AuthError,
    OutcomeUnknown,
    PaymentRequired,
    PermanentApiError,
    TransientApiError,
)

BASE_S = 0.5
CAP_S = 30.0
RETRY_AFTER_CAP_S = 120.0

# Transport failure kinds, as named by client.py for the httpx exception it caught.
NEVER_SENT = frozenset({"connect", "connect_timeout", "pool_timeout"})


def classify_status(status: int, creating: bool) -> type[ApiError]:
    """Error class for a non-success HTTP status.

    >>> classify_status(500, creating=True).__name__
    'OutcomeUnknown'
    >>> classify_status(500, creating=False).__name__
    'TransientApiError'
    """
    if status in (401, 403):
        return AuthError
    if status == 402:
        return PaymentRequired
    if status in (408, 429):
        return TransientApiError
    if status >= 500 or status == 409:
        return OutcomeUnknown if creating else TransientApiError
    return PermanentApiError  # 1xx/3xx (redirects are refused), 400, 404, 422 and other 4xx


def classify_failure(kind: str, creating: bool) -> type[ApiError]:
    """Error class for a transport failure: only failures before sending are safe for a POST."""
    if kind in NEVER_SENT or not creating:
        return TransientApiError
    return OutcomeUnknown


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or HTTP date), capped; else None."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return min(max(float(raw_ms) / 1000, 0.0), RETRY_AFTER_CAP_S)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return min(max(float(raw), 0.0), RETRY_AFTER_CAP_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return min(max(when - now, 0.0), RETRY_AFTER_CAP_S)


def backoff(
    attempt: int, rand: float, retry_after: float | None = None, base: float = BASE_S, cap: float = CAP_S
) -> float:
    """Seconds before retry number `attempt` (1-based): full jitter U(0, min(cap, base*2^(n-1))).

    A server's Retry-After is a floor, never shortened by jitter. `rand` is in [0, 1).
    >>> backoff(1, 0.5)
    0.25
    >>> backoff(3, 0.0, retry_after=2.0)
    2.0
    """
    delay = rand * min(cap, base * 2 ** max(attempt - 1, 0))
    return max(delay, retry_after) if retry_after is not None else delay


class CircuitBreaker:
    """closed -> open after `threshold` consecutive failures; half-open after `cooldown`.

    In half-open exactly one caller gets `allow() == True` (the probe); its success closes
    the breaker, its failure re-opens it with a doubled cooldown (up to `max_cooldown`).
    `trip_forever()` is for 401/402/403: nothing more is sent.
    """

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 2.0,
        max_cooldown: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.threshold, self.base_cooldown, self.max_cooldown, self.clock = threshold, cooldown, max_cooldown, clock
        self.cooldown = cooldown
        self.failures = 0
        self.state = "closed"
        self.opened_at = 0.0
        self.probing = False
        self.opens = 0
        self.probes = 0

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "dead":
            return False
        if self.clock() - self.opened_at >= self.cooldown and not self.probing:
            self.state, self.probing = "half-open", True
            self.probes += 1
            return True
        return False

    def wait_time(self) -> float:
        if self.state in ("closed", "dead"):
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def success(self) -> None:
        if self.state == "dead":
            return
        self.state, self.failures, self.probing, self.cooldown = "closed", 0, False, self.base_cooldown

    def failure(self) -> None:
        if self.state == "dead":
            return
        self.failures += 1
        if self.state == "half-open":
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self.failures >= self.threshold and self.state == "closed":
            self._open()

    def _open(self) -> None:
        self.state, self.opened_at, self.probing = "open", self.clock(), False
        self.opens += 1

    def trip_forever(self) -> None:
        self.state = "dead"
