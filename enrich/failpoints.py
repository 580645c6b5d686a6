"""Crash-test failpoints: `ENRICH_FAILPOINT=name:k[:SIG][,name:k[:SIG]]` makes the process send itself
a signal (SIGKILL unless SIG says INT, TERM or HUP: a Ctrl-C at exactly that point) on the k-th hit of a
named point. Unset, `hit()` is one dict truthiness check.

Points: after_intent_commit, after_send_before_response, after_response_before_commit,
mid_poll, after_result_commit, mid_write, mid_cache_write (inside a write to the shared results cache, before
its commit).
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "after_intent_commit",
    "after_send_before_response",
    "after_response_before_commit",
    "mid_poll",
    "after_result_commit",
    "mid_write",
)
# hit only by a job with a shared results cache (reuse.py); kept apart so the sweeps over POINTS see every point fire
CACHE_POINTS = ("mid_cache_write",)


SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM, "HUP": signal.SIGHUP}


def _parse(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    armed: dict[str, tuple[int, signal.Signals]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = part.partition(":")
        k, _, sig = rest.partition(":")
        if name not in POINTS + CACHE_POINTS:
            raise SystemExit(f"ENRICH_FAILPOINT: unknown point {name!r}; known: {', '.join(POINTS + CACHE_POINTS)}")
        if (sig or "KILL") not in SIGNALS:
            raise SystemExit(f"ENRICH_FAILPOINT: unknown signal {sig!r}; known: {', '.join(SIGNALS)}")
        armed[name] = (int(k or 1), SIGNALS[sig or "KILL"])
    return armed


_ARMED = _parse(os.environ.get("ENRICH_FAILPOINT", ""))
_HITS: dict[str, int] = {}


def hit(name: str) -> None:
    """Count a pass through `name`; send the armed signal to this process on the armed k-th pass."""
    if not _ARMED or name not in _ARMED:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    k, sig = _ARMED[name]
    if _HITS[name] == k:
        os.kill(os.getpid(), sig)
