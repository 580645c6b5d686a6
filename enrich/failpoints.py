"""Crash-test failpoints: `ENRICH_FAILPOINT=name:k[,name:k]` makes the process SIGKILL
itself on the k-th hit of a named point. Unset, `hit()` is one dict truthiness check.

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


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, k = part.partition(":")
        if name not in POINTS + CACHE_POINTS:
            raise SystemExit(f"ENRICH_FAILPOINT: unknown point {name!r}; known: {', '.join(POINTS + CACHE_POINTS)}")
        armed[name] = int(k or 1)
    return armed


_ARMED = _parse(os.environ.get("ENRICH_FAILPOINT", ""))
_HITS: dict[str, int] = {}


def hit(name: str) -> None:
    """Count a pass through `name`; die by SIGKILL if this is the armed k-th pass."""
    if not _ARMED or name not in _ARMED:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == _ARMED[name]:
        os.kill(os.getpid(), signal.SIGKILL)
