"""enrich: turn a spreadsheet into a researched one with Parallel's Task API.

Pipeline: read (stream rows) -> submit (batched, budgeted, paced) -> poll (event stream,
bulk result fetch) -> write (input columns + researched fields + evidence columns).
Every step is recorded in a SQLite journal so a crashed or interrupted job resumes
without losing a row or paying twice for one.
"""

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


def enrich_frame(*args, **kwargs):
    """Enrich a polars or pandas DataFrame (see enrich.notebook.enrich_frame)."""
    from enrich.notebook import enrich_frame as impl

    return impl(*args, **kwargs)


def run_job(*args, **kwargs):
    """Run one job to its end (see enrich.job.run_job): what the CLI, notebooks and partitions call."""
    from enrich.job import run_job as impl

    return impl(*args, **kwargs)


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
