"""The one error tree of enrich. Every error carries a one-line, user-facing message.

    EnrichError                      exit code
    ├── ConfigError                  2   bad config file, flag or environment
    ├── InputError                   2   bad input file: names file, line/column and problem
    ├── JournalError                 2   journal unusable, locked by another run, or drifted
    │   ├── JournalLocked                another process holds the journal's lock
    │   ├── TransitionError              a row was not where a transition starts (a bug or a second writer)
    │   └── DuplicateKey                 the same key twice in one input
    ├── OutputError                  2   the output cannot be written (results are safe in the journal)
    ├── StorageError                74   the disk holding the journal or output is full or failing (resumable)
    ├── BudgetExceeded               4   the next run would cross the budget
    │   └── DailyBudgetExceeded          ... or today's (UTC) daily budget on the spend ledger
    └── ApiError
        ├── TransientApiError        -   safe to retry: the request created nothing
        ├── PermanentApiError        3   this request/row is bad (400/404/422): retrying cannot help
        ├── OutcomeUnknown           -   a paid run may exist: reconcile before any resubmit
        ├── AuthError                5   401/403: aborts the run
        ├── PaymentRequired          5   402: aborts the run
        └── ApiUnavailable          69   nothing answers at the base URL (resumable)

Retry decisions are made with isinstance() on this tree (see retry.py), never by
matching message text. Messages never contain the API key: `redact()` is applied by the CLI
as a backstop before anything is printed. A message that suggests a remedy spells it for its
caller (`advice`): command-line flags for `enrich`, keyword arguments for `enrich_frame`.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
from collections.abc import Iterator
from pathlib import Path

# The exit codes: this module is their one owner. Each error class names its own (`exit_code`);
# JobResult.exit_code is one of these; the CLI, the notebook and the README's table read them here.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED_ROWS = 3
EXIT_BUDGET = 4
EXIT_AUTH = 5
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70  # a bug: a stage raised what it should not
EXIT_DISK = 74
EXIT_INTERRUPTED = 75
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # a full or failing disk: EXIT_DISK, resumable
EXIT_CODES = {
    EXIT_OK: "all rows completed",
    EXIT_USAGE: "usage, config or input error (nothing was sent)",
    EXIT_FAILED_ROWS: "finished with failed, timed-out, action_required or unknown rows",
    EXIT_BUDGET: "budget exhausted (rows skipped_budget)",
    EXIT_AUTH: "auth or payment error (401/402/403)",
    EXIT_UNAVAILABLE: "the API could not be reached (resumable)",
    EXIT_SOFTWARE: "internal error (a bug; the journal is intact, run again to resume; please report it)",
    EXIT_DISK: "the disk holding the journal or output is full or failing (resumable: free space, run again)",
    EXIT_INTERRUPTED: "interrupted (resumable: run the same command again)",
}

# who the messages speak to: "cli" (flags) or "python" (enrich_frame's keyword arguments); a context
# variable so that concurrent callers in one process (threads, tasks) each keep their own
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("enrich_caller", default="cli")


def advice(cli: str, python: str) -> str:
    """The remedy in the caller's words: `cli` for the command line, `python` within `python_caller()`."""
    return python if _CALLER.get() == "python" else cli


@contextlib.contextmanager
def python_caller() -> Iterator[None]:
    """Within this block (and the job threads it starts with its context), errors advise keyword arguments."""
    token = _CALLER.set("python")
    try:
        yield
    finally:
        _CALLER.reset(token)


class EnrichError(Exception):
    """Base of every error enrich raises on purpose; `str(err)` is the user message."""

    exit_code = 1


class ConfigError(EnrichError):
    """The config file, a flag or an environment variable is invalid."""

    exit_code = EXIT_USAGE


class SheetPath(str):
    """A location inside a workbook, `file [sheet]`: InputError then says `row N` (as the spreadsheet shows it).

    A plain `str` everywhere else (journal metadata, messages), so code that passes paths along needs no change.
    """


class InputError(EnrichError):
    """The input file cannot be used; raised before any API call.

    The message always starts with `file:line[:column]:` so editors and CI logs link to it; for a
    workbook sheet (`SheetPath`) it starts with `file [sheet] row N:`.
    """

    exit_code = EXIT_USAGE

    def __init__(self, path: str, reason: str, line: int | None = None, column: str | int | None = None):
        self.path, self.reason, self.line, self.column = path, reason, line, column
        where = path
        if line is not None:
            where += f" row {line}" if isinstance(path, SheetPath) else f":{line}"
        if column is not None:
            where += f": column {column!s}"
        super().__init__(f"{where}: {reason}")


class JournalError(EnrichError):
    """The journal is locked by another run, corrupt, or belongs to a different job."""

    exit_code = EXIT_USAGE


class JournalLocked(JournalError):
    """Another process (a run, `review apply`) holds the journal's lock: it may change it, so nothing is written."""


class CacheError(EnrichError):
    """The shared results cache (`[cache] path`, `--cache`) is corrupt, foreign, or from a newer enrich."""

    exit_code = EXIT_USAGE


class OutputError(EnrichError):
    """Writing the output failed (e.g. the folder became read-only); every result is in the journal.

    A full or failing disk is a StorageError (exit 74) instead."""

    exit_code = EXIT_USAGE


class StorageError(EnrichError):
    """The disk under the journal or the output is full (or fails to write); the last commit is intact, resumable."""

    exit_code = EXIT_DISK


def disk_message(path: object, problem: str, what: str) -> str:
    """One line for a full or failing disk: what could not be written, where to free space, and that the job resumes.

    `what` says what is safe (e.g. "the journal keeps everything up to its last commit").
    """
    folder = Path(str(path)).parent
    try:
        st = os.statvfs(folder)
        n = st.f_bavail * st.f_frsize
        free = f" ({n / 1e6:,.1f} MB free there now)" if n >= 1e6 else f" ({n // 1000:,} kB free there now)"
    except OSError:
        free = ""
    return (
        f"cannot write {path}: {problem}; free space on the disk holding {folder}{free}, then run the same "
        f"command again: {what}"
    )


class BudgetExceeded(EnrichError):
    """Reserving one more run would cross the configured budget."""

    exit_code = EXIT_BUDGET


class ApiError(EnrichError):
    """A request to the Task API did not succeed. `status` is the HTTP status, if any."""

    exit_code = EXIT_FAILED_ROWS

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TransientApiError(ApiError):
    """Safe to retry: the server did not act on the request (connect error, 408, 429, 503 on GET...)."""


class PermanentApiError(ApiError):
    """The request is wrong and will stay wrong (400, 404, 422); the row is marked failed."""


class OutcomeUnknown(ApiError):
    """A creating request may or may not have created paid runs; reconcile before resubmitting."""


class AuthError(ApiError):
    """401 or 403: the key is missing, wrong, or not allowed this processor. Ends the run."""

    exit_code = EXIT_AUTH


class PaymentRequired(ApiError):
    """402: the account's credit cannot cover more runs. Ends the run."""

    exit_code = EXIT_AUTH


class ApiUnavailable(ApiError):
    """The API cannot be reached at all (nothing listening, outage): the job stops, resumable."""

    exit_code = EXIT_UNAVAILABLE


class DailyBudgetExceeded(BudgetExceeded):
    """Today's (UTC) daily budget, shared by every job on the same spend ledger, is spent."""


class TransitionError(JournalError):
    """A row was not in a state the transition starts from: a bug or a second writer, never ignored."""


class DuplicateKey(JournalError):
    """The same key appears twice in one input file."""

    def __init__(self, key: str, first_line: int, line: int):
        super().__init__(f"duplicate key {key} (first at line {first_line})")
        self.key, self.first_line, self.line = key, first_line, line


MIN_SECRET_CHARS = 16  # API keys are longer; anything shorter is no secret (the README's emulator key is `local`)


def redact(text: str, secret: str | None) -> str:
    """Replace every occurrence of `secret` in `text`: a backstop for a server that echoes the key back.

    enrich never puts the key into a message itself (client.py). Only a `secret` of at least
    MIN_SECRET_CHARS characters is replaced: a short one is no secret, and replacing it would garble
    ordinary text (`local` inside `http://localhost:8765`).

    >>> redact("bad key sk-0123456789abcdef0123", "sk-0123456789abcdef0123")
    'bad key [REDACTED]'
    >>> redact("cannot reach http://localhost:9", "local")
    'cannot reach http://localhost:9'
    """
    if secret and len(secret) >= MIN_SECRET_CHARS:
        return text.replace(secret, "[REDACTED]")
    return text
