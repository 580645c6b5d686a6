"""The metadata every run carries, `{enrich_job, enrich_row, enrich_try}`: the one place that writes it
and reads it back (submit.py sends it; poll.py and reconcile.py attribute runs to rows by it).

Values are sent as strings, as the docs ask ("keys and values must be strings"). The spec and the SDK
type echoed values as string | integer | number | boolean, so what comes back is read tolerantly: a
try of `"1"`, `1`, `1.0` or `"1.0"` is try 1. A run whose job and row are ours but whose try cannot be
read is still ours: `Owner.attempt` is None, and the caller matches it by run id (its row's current
attempt) and logs it; it is never taken for a run of another row, nor for a missing one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Owner:
    """The row a run's metadata names: `row_ref` (enrich_row) and `attempt` (enrich_try; None = unreadable)."""

    row_ref: str
    attempt: int | None
    raw_attempt: Any = None  # what the server echoed for enrich_try (for the log line when unreadable)


def run_metadata(job_tag: str, row_ref: str, attempt: int, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata sent with one run: the user's own keys, then enrich's (as strings).

    >>> run_metadata("job1", "ref9", 2)
    {'enrich_job': 'job1', 'enrich_row': 'ref9', 'enrich_try': '2'}
    """
    return {**(user or {}), "enrich_job": job_tag, "enrich_row": row_ref, "enrich_try": str(attempt)}


def parse_try(value: Any) -> int | None:
    """An echoed enrich_try as an integer >= 1, or None when it is not one.

    >>> [parse_try(v) for v in ("1", 1, 1.0, "1.0", " 2 ", "1.5", True, "x", None, 0)]
    [1, 1, 1, 1, 2, None, None, None, None, None]
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value >= 1:
        return int(value)
    return None


def owner(run: Mapping[str, Any], job_tag: str) -> Owner | None:
    """The row of this job a run object's metadata names, or None when it names none (absent, another job's)."""
    meta = run.get("metadata")
    if not isinstance(meta, Mapping) or str(meta.get("enrich_job")) != job_tag:
        return None
    ref = meta.get("enrich_row")
    if not isinstance(ref, str) or not ref:
        return None
    raw = meta.get("enrich_try")
    return Owner(ref, parse_try(raw), raw)
