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
]
