"""enrich: turn a spreadsheet into a researched one with Parallel's Task API.

Pipeline: read (stream rows) -> submit (batched, budgeted, paced) -> poll (event stream,
bulk result fetch) -> write (input columns + researched fields + evidence columns).
Every step is recorded in a SQLite journal so a crashed or interrupted job resumes
without losing a row or paying twice for one.

`import enrich` runs nothing but this file: the error classes, `enrich_frame` and `run_job` load on first use
(PEP 562), so the `enrich` command's own guard (launch.py) is in place before any of enrich's modules load and a
Ctrl-C while they do is one line, not a traceback.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing takes a while at start-up, see the docstring
if TYPE_CHECKING:
    from typing import Any

    from enrich.errors import (
        ApiError,
        ApiUnavailable,
        AuthError,
        BudgetExceeded,
        ConfigError,
        EnrichError,
        InputError,
        JournalError,
        OutcomeUnknown,
        PaymentRequired,
        PermanentApiError,
        TransientApiError,
    )

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`enrich.ConfigError` and the other error classes, from enrich.errors when first asked for."""
    if name in _ERRORS:
        value = getattr(importlib.import_module("enrich.errors"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'enrich' has no attribute {name!r}")


def enrich_frame(*args: Any, **kwargs: Any) -> Any:
    """Enrich a polars or pandas DataFrame (see enrich.notebook.enrich_frame)."""
    return importlib.import_module("enrich.notebook").enrich_frame(*args, **kwargs)


def run_job(*args: Any, **kwargs: Any) -> Any:
    """Run one job to its end (see enrich.job.run_job): what the CLI, notebooks and partitions call."""
    return importlib.import_module("enrich.job").run_job(*args, **kwargs)


__all__ = [
    "ApiError",
    "ApiUnavailable",
    "AuthError",
    "BudgetExceeded",
    "ConfigError",
    "EnrichError",
    "InputError",
    "JournalError",
    "OutcomeUnknown",
    "PaymentRequired",
    "PermanentApiError",
    "TransientApiError",
    "__version__",
    "enrich_frame",
    "run_job",
]
_ERRORS = frozenset(n for n in __all__ if n[0].isupper())  # the error classes, from enrich.errors
