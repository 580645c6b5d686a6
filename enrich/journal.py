"""The job journal: one SQLite file per job, the only module that imports sqlite3.

Row states (`journal_sql.RowState` is their vocabulary; this is where the transitions are drawn):

    pending ──claim──> intent ──2xx──> submitted ──result (matched by metadata)──> done
       ^                 │ │                │  └──run failed/cancelled────────────> failed
       │   safe failure  │ │ lost/ambiguous │  └──API says still active after row_timeout_s──> timed_out
       ├─────────────────┘ v                │  └──run waits in action_required, no run active──> action_required
       │   confirmed     unknown ──found in the group listing──> submitted
       └───missing───────┘
    done/failed/timed_out ──input, task spec or processor changed, refresh due, --retry-failed──> pending
    timed_out ──--retry-failed──> submitted   (its run is asked again: a finished result is reused)
    action_required ──the next run of the job──> submitted   (its run is asked again before anything is sent)
    pending ──a result for its (input, spec, processor) in this journal, or in the shared cache──> done
    pending (waits) ──its twin's run ended──> done | failed | timed_out   (the twin's outcome: one run, N rows)
    pending (an escalation step, no run created on it) ──its row no longer needs it (a verdict)──> done
    any but in flight ──does not match `[input] where`──> skipped ──matches again──> pending
    in flight, not matching `[input] where` at the last seeding ──result──> skipped (kept in results; never climbs)

Twins are rows whose task input (canonical JSON of the columns sent), task spec and processor are identical.
With dedupe (the default) one of them is the leader: it alone is claimed and paid for; the others are
`pending` with `waits = 1` and take its run's outcome the moment it is recorded (`_share`, in the same
transaction). A row waits while a twin is in flight on that processor, or pending earlier in the input;
seeding decides it for every row, a climb for the rows it moves (WAITS_SQL).

Every transition is one method that names its from-states and raises `TransitionError` when a
row is not where it should be (a race between two writers shows up as an error, never as a
silent double payment).

`intent` is committed, with its budget reservation, *before* the request is sent; so after any
crash every row that might have a paid run is `intent`/`unknown`/`submitted`, and
reconciliation settles it against the task group's run listing before anything is resubmitted.

Runs are never matched to rows by position: an add-runs reply only adds its run ids to the
`runs` table (what the poller waits for); which row a run belongs to is learned from the run's
own metadata (`enrich_row`, `enrich_try`) on every result, listing entry and event, or, when a
reply leaves it out, from a pairing already proven (`rows.run_id`, `attribute`). Every
completed result is kept in `results`, keyed by run id and looked up by (input, task spec,
processor), so switching a config back reuses what was already paid for.

Money is integer micro-dollars in the append-only `spend` table: +price when a run is reserved,
-price when it is proven never created.

Settings follow reliability.md 2.3: WAL, synchronous=FULL, one writer connection with explicit
BEGIN IMMEDIATE, short transactions never held across network awaits, and an exclusive flock on
the journal file itself (its inode, so a symlink cannot bypass it; hard links are refused since
SQLite's WAL file is named after the path).

A journal on a network file system is opened in the `network` mode instead (storage.py): SQLite's
rollback journal (journal_mode=DELETE), since WAL's shared-memory index cannot be shared between
hosts. The lock, the transactions and everything above are the same in both modes.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enrich.errors import (
    BudgetExceeded,
    DailyBudgetExceeded,
    DuplicateKey,
    JournalError,
    JournalLocked,
    StorageError,
    TransitionError,
    advice,
    disk_message,
)
from enrich.journal_decisions import DecisionStore
from enrich.journal_sql import (
    EXCLUDED_SQL,
    IN_FLIGHT,
    LEDGER_SCHEMA,
    REUSE_SQL,
    ROW_STATES,
    SCHEMA,
    SCHEMA_VERSION,
    SEED_SQL,
    SHARE_SQL,
    TERMINAL,
    WAITS_SQL,
    RowState,
    add_reuse_columns,
    add_run_columns,
    chunks,
    migrate_v1,
)
from enrich.spend import daily_message, runs_that_fit, utc_day
from enrich.storage import JournalMode

__all__ = [
    "IN_FLIGHT",
    "LEDGER_SCHEMA",
    "ROW_STATES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TERMINAL",
    "Cached",
    "Claimed",
    "DailyBudgetExceeded",
    "DuplicateKey",
    "Finished",
    "Journal",
    "RowState",
    "TransitionError",
    "Unresolved",
]


_DISK_ERRORS = (10, 13)  # SQLITE_IOERR, SQLITE_FULL (primary result codes)


class _Connection(sqlite3.Connection):
    """A journal connection whose disk-full and I/O errors leave as StorageError naming the file (exit 74)
    instead of a sqlite3 traceback; anything else is unchanged."""

    where = "the journal"

    def _storage(self, exc: sqlite3.Error) -> StorageError | None:
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF not in _DISK_ERRORS:
            return None
        return StorageError(
            disk_message(
                self.where,
                str(exc),
                "the journal keeps everything up to its last commit, and the job resumes where it stopped",
            )
        )

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            if (err := self._storage(exc)) is not None:
                raise err from None
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.Error as exc:
            if (err := self._storage(exc)) is not None:
                raise err from None
            raise

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        try:
            return super().executescript(script)
        except sqlite3.Error as exc:
            if (err := self._storage(exc)) is not None:
                raise err from None
            raise


def _recovering_view(path: Path) -> sqlite3.Connection:
    """A query-only connection for a journal in the network mode whose writer died mid-transaction: a read-only
    one cannot read it until SQLite rolls that transaction back (SQLITE_READONLY_ROLLBACK), which this one
    does on its first read, as the next writer would (committed data is never touched). Nothing is written."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=5)
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA user_version").fetchone()  # the first read rolls the unfinished transaction back
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(
            f"{path}: a run stopped in the middle of a transaction and this process cannot roll it back ({exc}); "
            "run the job again (or read it as the user that runs it)"
        ) from None
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does itself on a full disk), keeping
    the error that caused it as the one raised."""
    if conn.in_transaction:
        with suppress(sqlite3.Error, StorageError):
            conn.execute("ROLLBACK")


def by_price(prices: dict[str, int]) -> list[str]:
    """Processors cheapest first (the order claims take them in: first tier before escalation steps)."""
    return sorted(prices, key=lambda p: (prices[p], p))


@dataclass
class Claimed:
    row_key: str
    row_ref: str
    attempt: int
    input: Any
    processor: str


@dataclass(frozen=True)
class Cached:
    """A completed result the shared cache holds for one (input hash, spec fingerprint, processor)."""

    run_id: str  # the run that paid for it, in the job that ran it
    completed_at: float
    result_json: str


# The claim's look-up in the shared cache (reuse.ResultCache.lookup): the (input hash, spec hash, processor)
# keys of the rows about to be claimed -> (the results it holds for some of them, its last entry number seen).
Serve = Callable[[list[tuple[str, str, str]]], tuple[dict[tuple[str, str, str], Cached], int]]


@dataclass
class Unresolved:
    row_key: str
    row_ref: str
    attempt: int
    intent_at: float
    batch: int | None


@dataclass
class Finished:
    """A run the API reports as finished, attributed by its own metadata."""

    run_id: str
    row_ref: str | None
    attempt: int | None
    result_json: str | None = None  # completed
    error: str | None = None  # failed / cancelled


class Journal(DecisionStore):
    """A job journal. Open with `Journal.open(path)`; a read-only view with `readonly=True`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, lock_fd: int | None):
        self.conn, self.path, self._lock_fd = conn, path, lock_fd
        self.readonly = False
        self.last_seed_counts: dict[str, int] = {}
        self.last_seed_waiting = 0  # pending rows that wait for a twin's run (dedupe), at the last seeding
        self.dedupe = False  # set by pipeline.prepare from `[input] dedupe`: twins share one run
        # may a row wait for a twin? Only WAITS_SQL makes one wait (seeding, a climb, unstick), so while it found
        # none the per-result share step is skipped (a job without duplicates pays nothing for dedupe)
        self.twins = True
        self.reused_moves = 0  # rows this process gave an outcome without a run of their own (twins, cache)

    # ---- opening, locking --------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, readonly: bool = False, mode: JournalMode | None = None) -> Journal:
        """Open (creating) a journal and take its lock; JournalError if another process holds it.

        `mode` (storage.py) puts the journal in WAL ("local") or SQLite's rollback journal ("network");
        None keeps the mode the journal is in (its header records it), as commands other than `run` do
        (a new journal is then a local one)."""
        if str(path) == ":memory:":  # scratch journal for `enrich plan` on a new job
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.executescript(SCHEMA)
            return cls(conn, Path(":memory:"), None)
        path = Path(os.path.realpath(path))  # SQLite names the -wal file after the path: use one path
        if readonly:
            if not path.is_file():
                raise JournalError(f"{path}: no such journal")
            try:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5)
                try:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                except sqlite3.OperationalError as exc:
                    if getattr(exc, "sqlite_errorname", "") != "SQLITE_READONLY_ROLLBACK":
                        raise
                    conn.close()
                    conn = _recovering_view(path)
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except sqlite3.DatabaseError as exc:
                raise JournalError(f"{path}: not an enrich journal ({exc})") from None
            if "rows" not in tables or "meta" not in tables:
                conn.close()
                raise JournalError(f"{path}: not an enrich journal (no job recorded in it)")
            if version > SCHEMA_VERSION:
                conn.close()
                raise JournalError(f"{path}: journal was written by a newer enrich (schema {version})")
            view = cls(conn, path, None)
            view.readonly = True
            return view
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # created 0600: it may hold PII
        try:
            # the lock is on the file itself (its inode): every name of it shares one lock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(
                f"{path}: journal is in use by another enrich process; "
                "wait for it to finish or stop it (its progress is kept)"
            ) from None
        if os.fstat(fd).st_nlink > 1:
            os.close(fd)
            raise JournalError(
                f"{path}: journal has {os.stat(path).st_nlink} hard links; SQLite keeps its "
                "write-ahead log beside one name only, so use a single name (remove the extra links)"
            )
        try:
            conn = sqlite3.connect(
                str(path), isolation_level=None, timeout=5, check_same_thread=False, factory=_Connection
            )
            conn.where = str(path)
            if mode == "network":
                # EXCLUSIVE first: a journal a local run left in WAL is opened with its index in this process's
                # memory (never a -shm on shared storage) while it is switched; NORMAL again afterwards, so
                # read-only views (status, the governor) can read between this writer's transactions
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
                got = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
                conn.execute("PRAGMA locking_mode=NORMAL")
                if got != "delete":
                    raise JournalError(
                        f"{path}: cannot switch the journal to the network mode (SQLite left it in {got}); "
                        "stop every other process that has it open and run again"
                    )
            elif mode == "local" or os.fstat(fd).st_size == 0:  # a new journal is a local one unless told
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB: keeps big journals' B-trees in memory
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"{path}: journal was written by a newer enrich (schema {version})")
            if version == 1:
                migrate_v1(conn)
            conn.executescript(SCHEMA)
            add_run_columns(conn)
            add_reuse_columns(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            os.close(fd)
            raise JournalError(f"{path}: not a usable journal ({exc})") from None
        except (StorageError, JournalError):
            os.close(fd)
            raise
        return cls(conn, path, fd)

    def sqlite_mode(self) -> str:
        """SQLite's journal mode as the file records it: "wal" (the local mode) or "delete" (the network one)."""
        return str(self.conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def close(self) -> None:
        self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)  # also after a failed COMMIT (disk full), which leaves the transaction open
            raise

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def is_empty(self) -> bool:
        """No row was ever recorded (a new, emptied or foreign journal)."""
        return self.conn.execute("SELECT 1 FROM rows LIMIT 1").fetchone() is None

    # ---- meta ----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value: Any, conn: sqlite3.Connection | None = None) -> None:
        sql = "INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v"
        if conn is not None:
            conn.execute(sql, (key, json.dumps(value)))
        else:
            with self.tx() as c:
                c.execute(sql, (key, json.dumps(value)))

    def log(self, level: str, message: str) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO log(at, level, message) VALUES (?, ?, ?)", (time.time(), level, message[:2000]))

    def last_error(self) -> str | None:
        row = self.conn.execute("SELECT message FROM log WHERE level='error' ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def check_identity(self, identity: dict[str, Any], adopt: bool) -> None:
        """Refuse a job whose identity (output, task spec, key columns, API key hash) differs from the
        one this journal holds, unless `adopt`; record it otherwise. Raises JournalError (exit 2)."""
        held = self.get("identity")
        if held and not self.get("taskgroup_id"):  # nothing was created yet: the API key is not bound
            held = {**held, "api_key": identity.get("api_key")}
        if held and held != identity and not adopt:
            diff = ", ".join(sorted(k for k in identity if held.get(k) != identity.get(k)))
            raise JournalError(
                f"{self.path}: this journal belongs to another job (different {diff}); "
                + advice(
                    "use another --journal, or pass --adopt to take it over for this job",
                    "pass another journal=, or adopt=True to take it over for this job",
                )
            )
        if held != identity:
            self.set("identity", identity)

    def rehash_spec(self, old: str, new: str) -> int:
        """Rename a task-spec fingerprint (a journal from schema 1 hashed the processor in): no re-run."""
        with self.tx() as c:
            n = c.execute("UPDATE rows SET spec_hash=? WHERE spec_hash=?", (new, old)).rowcount
            c.execute("UPDATE rows SET run_spec_hash=? WHERE run_spec_hash=?", (new, old))
            c.execute("UPDATE results SET spec_hash=? WHERE spec_hash=?", (new, old))
        return n

    # ---- seeding -------------------------------------------------------------------------
    def seed(
        self,
        batches: Iterable[list[tuple[Any, ...]]],
        epoch: int,
        refresh_before: float | None,
        retry_failed: bool,
        dry: bool = False,
        meta: dict[str, Any] | None = None,
        inspect: Callable[[], Any] | None = None,
        dedupe: bool | None = None,
    ) -> Any:
        """Record the current input: one transaction for the whole file, rolled back on any error.

        Each item is (row_key, row_ref, ordinal, line, row_json, input_json, input_hash, spec_hash,
        processor[, "skipped"]). In-flight rows stay in flight; a row given as skipped (it does not match
        `[input] where`) is skipped; failed/timed-out rows stay so unless `retry_failed` or their input changed
        (a timed-out run is asked again rather than paid again); every other row is pending, then done at once
        if `results` already holds a result for its (input, spec, processor) newer than `refresh_before` (with
        `dedupe` off, only a result of its own). With `dedupe` (default: `self.dedupe`), pending twins wait for
        one leader (WAITS_SQL). Raises `DuplicateKey`.
        With `dry` the transaction is rolled back after counting (`last_seed_counts`), for `plan`; `inspect`
        then reads the seeded journal before the rollback, and its answer is returned.
        """
        if dedupe is not None:
            self.dedupe = dedupe
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(EXCLUDED_SQL)
            conn.execute("DELETE FROM temp.excluded")
            for batch in batches:
                keys = [r[0] for r in batch]
                if len(set(keys)) != len(keys):
                    seen: dict[str, int] = {}
                    for r in batch:
                        if r[0] in seen:
                            raise DuplicateKey(r[0], seen[r[0]], r[3])
                        seen[r[0]] = r[3]
                for chunk in chunks(keys):
                    marks = ",".join("?" * len(chunk))
                    # `+epoch`: look each key up in its unique index; an index on epoch would scan the
                    # whole input so far for every batch (quadratic: 1,000,000 rows took minutes)
                    hit = conn.execute(
                        f"SELECT row_key, line FROM rows WHERE row_key IN ({marks}) AND +epoch=? LIMIT 1",
                        (*chunk, epoch),
                    ).fetchone()
                    if hit:
                        line2 = next(r[3] for r in batch if r[0] == hit[0])
                        raise DuplicateKey(hit[0], hit[1], line2)
                conn.executemany(
                    SEED_SQL,
                    [(*r[:9], epoch, int(retry_failed), r[9] if len(r) > 9 else "pending") for r in batch],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO temp.excluded VALUES (?)",
                    [(r[0],) for r in batch if len(r) > 9 and r[9] == "skipped"],
                )
            # only rows left in flight need it: their result, when it comes, makes them skipped (record)
            conn.execute(
                "DELETE FROM temp.excluded WHERE row_key NOT IN (SELECT row_key FROM rows WHERE epoch=? AND state IN "
                "('intent', 'unknown', 'submitted', 'action_required'))",
                (epoch,),
            )
            if retry_failed:  # a timed-out run may have finished since: ask for it before paying again
                conn.execute(
                    "UPDATE runs SET state='waiting' WHERE state='timed_out' AND run_id IN "
                    "(SELECT run_id FROM rows WHERE epoch=? AND state='submitted')",
                    (epoch,),
                )
            conn.execute(REUSE_SQL, {"epoch": epoch, "fresh": refresh_before, "dedupe": int(self.dedupe)})
            if self.dedupe:
                conn.execute(WAITS_SQL.format(scope="rows.epoch=:epoch"), {"epoch": epoch})
            self.last_seed_waiting = self.waiting(epoch)
            self.twins = self.last_seed_waiting > 0
            self.set("epoch", epoch, conn)
            for k, v in (meta or {}).items():
                self.set(k, v, conn)
            self.last_seed_counts = dict(
                conn.execute("SELECT state, COUNT(*) FROM rows WHERE epoch=? GROUP BY state", (epoch,))
            )
            inspected = inspect() if dry and inspect is not None else None
            conn.execute("ROLLBACK" if dry else "COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return inspected

    # ---- submission ----------------------------------------------------------------------
    def spent_micros(self) -> int:
        return self.conn.execute("SELECT COALESCE(SUM(micros), 0) FROM spend").fetchone()[0]

    def paid_by_processor(self) -> dict[str | None, tuple[int, int]]:
        """processor -> (runs, micro-dollars) of every run paid for or reserved and not released: completed, failed,
        timed out, superseded by an escalation step or still in doubt, over the journal's whole history (what
        `spent_micros` sums). None keys what a journal from before per-processor accounting cannot attribute."""
        proc = "processor" if self._has_column("spend", "processor") else "NULL"
        out: dict[str | None, tuple[int, int]] = {}
        for p, runs, micros in self.conn.execute(
            f"SELECT {proc}, SUM(CASE WHEN reason='reserve' THEN 1 WHEN micros<0 THEN -1 ELSE 0 END), SUM(micros) "
            f"FROM spend GROUP BY {proc}"
        ):
            if runs or micros:
                out[p] = (runs, micros)
        return out

    def run_latencies(self) -> Iterator[tuple[str | None, float]] | None:
        """(processor, finished - created in seconds, journal clock, >= 0, to the ms) of every run whose outcome was
        recorded, completed or failed; None for a read-only view of a journal written before runs carried their
        finish time."""
        if not self.times_runs():
            return None
        return iter(
            self.conn.execute(
                "SELECT processor, ROUND(MAX(0.0, finished_at - created_at), 3) FROM runs WHERE finished_at IS NOT NULL"
            )
        )

    def times_runs(self) -> bool:
        """Do runs carry their finish time (false only in a read-only view of an older journal)?"""
        return self._has_column("runs", "finished_at")

    def _has_column(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self.conn.execute(f"PRAGMA table_info({table})"))

    def has_pending(self, epoch: int, now: float | None = None) -> bool:
        """Is any row pending that may be claimed (not waiting for a twin; with `now`, ready to be sent)? An index
        probe, not a count."""
        args: tuple[Any, ...]
        if now is None:
            sql, args = "SELECT 1 FROM rows WHERE epoch=? AND state='pending' AND waits=0 LIMIT 1", (epoch,)
        else:
            sql = (
                "SELECT 1 FROM rows WHERE epoch=? AND state='pending' AND waits=0 AND (next_at IS NULL OR next_at<=?) "
                "LIMIT 1"
            )
            args = (epoch, now)
        return self.conn.execute(sql, args).fetchone() is not None

    def pending_count(self, epoch: int, processor: str) -> int:
        """Runs still to claim on `processor`: its pending rows, those waiting for a twin's run aside."""
        return self.conn.execute(
            "SELECT COUNT(*) FROM rows WHERE epoch=? AND state='pending' AND processor=? AND waits=0",
            (epoch, processor),
        ).fetchone()[0]

    def next_batch(self, epoch: int, now: float, limit: int, prices: dict[str, int]) -> tuple[str, int, bool] | None:
        """What the next claim would take, budget aside: (processor, rows ready up to `limit`, whether it is
        the cheapest processor with pending rows; False when cheaper rows wait out a backoff). None when
        no row is ready. A governed partition leases for exactly this batch (submit.py)."""
        cheapest = True
        for processor in by_price(prices):
            if not self._pending_on(epoch, processor):
                continue
            ready = (
                "epoch=? AND state='pending' AND processor=? AND solo=? AND waits=0 AND (next_at IS NULL OR next_at<=?)"
            )
            if self.conn.execute(f"SELECT 1 FROM rows WHERE {ready} LIMIT 1", (epoch, processor, 1, now)).fetchone():
                return processor, 1, cheapest
            n = self.conn.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM rows WHERE {ready} LIMIT ?)", (epoch, processor, 0, now, limit)
            ).fetchone()[0]
            if n:
                return processor, n, cheapest
            cheapest = False
        return None

    def _pending_on(self, epoch: int, processor: str) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM rows WHERE epoch=? AND state='pending' AND processor=? AND waits=0 LIMIT 1",
                (epoch, processor),
            ).fetchone()
            is not None
        )

    def pending_by_processor(self, epoch: int) -> dict[str, int]:
        """Runs to claim per processor (pending rows, those waiting for a twin aside): a row on a processor
        above its first tier is an escalation step."""
        waits = "AND waits=0" if self._has_column("rows", "waits") else ""  # a read-only view of an older journal
        return dict(
            self.conn.execute(
                f"SELECT processor, COUNT(*) FROM rows WHERE epoch=? AND state='pending' {waits} GROUP BY processor",
                (epoch,),
            )
        )

    def in_flight_count(self, states: tuple[RowState, ...] = IN_FLIGHT) -> int:
        marks = ",".join("?" * len(states))
        return self.conn.execute(f"SELECT COUNT(*) FROM rows WHERE state IN ({marks})", states).fetchone()[0]

    def next_retry_at(self, epoch: int) -> float | None:
        return self.conn.execute(
            "SELECT MIN(next_at) FROM rows WHERE epoch=? AND state='pending'", (epoch,)
        ).fetchone()[0]

    def attach_ledger(self, path: Path | None, job: str) -> None:
        """Record spend per UTC day in `path` (a ledger shared by several jobs) or, with None, in this journal.
        Claims then check `daily_budget` against the ledger in the same transaction as the reservation."""
        self._ledger_job = job
        if path is None:
            self._ledger_db = "main"
        else:
            path = Path(os.path.realpath(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            try:
                self.conn.execute("ATTACH DATABASE ? AS spendledger", (str(path),))
                self.conn.execute("PRAGMA spendledger.journal_mode=WAL")
                self.conn.execute("PRAGMA spendledger.synchronous=FULL")
            except sqlite3.DatabaseError as exc:
                raise JournalError(f"{path}: not a usable spend ledger ({exc})") from None
            self._ledger_db = "spendledger"
        self.conn.executescript(LEDGER_SCHEMA.format(db=self._ledger_db))

    def claim(
        self,
        epoch: int,
        limit: int,
        prices: dict[str, int],
        budget: int | None,
        now: float,
        batch: int,
        daily_budget: int | None = None,
        serve: Serve | None = None,
    ) -> list[Claimed]:
        """pending -> intent for up to `limit` rows of one processor, with their budget reserved, committed
        before any send (one transaction).

        The cheapest processor with pending rows goes first, so every row's first-tier run is claimed
        before any escalation step (a stronger processor costs more), and a step that does not fit the
        budget never blocks a cheaper row that does. Within a processor, a solo row (its batch was
        rejected) goes alone, else rows go in input order. Cheaper rows waiting out a backoff keep
        their money: a dearer processor gets only what is left after them, and [] is returned rather
        than spend it. Raises BudgetExceeded when not even the cheapest pending run fits the budget,
        DailyBudgetExceeded when it does not fit today's daily budget (counted in the attached spend
        ledger across every job that shares it).

        Rows waiting for a twin's run are never claimed (one run, and one reservation, per distinct input).
        With `serve` (the shared cache's look-up), the rows picked are looked up in the cache in this same
        transaction: those it holds a result for are done with it (`_take`) instead of claimed, and more rows
        are picked; each claimed row records the cache's last entry number seen (`cache_seq`)."""
        with self.tx() as c:
            spent = c.execute("SELECT COALESCE(SUM(micros), 0) FROM spend").fetchone()[0]
            day = utc_day(now)
            today = self.spent_on_day(day) if daily_budget is not None else 0
            seq: int | None = None
            while True:
                got = self._pick(c, epoch, limit, prices, budget, daily_budget, spent, today, now)
                if got is None:
                    return []
                processor, price, ids = got
                if serve is None:
                    break
                served, seq = self._serve(c, ids, serve, now)
                ids = [i for i in ids if i not in served]
                if ids or not served:
                    break  # every row picked was served: pick again (each round moves rows out of pending)
            if not ids:
                return []
            c.executemany(
                "UPDATE rows SET state='intent', attempts=attempts+1, batch=?, intent_at=?, run_id=NULL, "
                "run_input_hash=input_hash, run_spec_hash=spec_hash, run_processor=processor, error=NULL, "
                "reused=NULL, cache_seq=? WHERE id=? AND state='pending' AND waits=0",
                [(batch, now, seq, i) for i in ids],
            )
            out: list[Claimed] = []
            for chunk in chunks(ids):
                marks = ",".join("?" * len(chunk))
                rows = c.execute(
                    f"SELECT id, row_key, row_ref, attempts, input_json FROM rows WHERE id IN ({marks}) "
                    "AND state='intent'",
                    chunk,
                ).fetchall()
                by_id = {r[0]: r for r in rows}
                if len(by_id) != len(chunk):
                    raise TransitionError("claim: a row left `pending` during its own claim")
                out.extend(
                    Claimed(by_id[i][1], by_id[i][2], by_id[i][3], json.loads(by_id[i][4]), processor) for i in chunk
                )
            c.executemany(
                "INSERT INTO spend(at, row_key, micros, reason, processor) VALUES (?, ?, ?, 'reserve', ?)",
                [(now, cl.row_key, price, processor) for cl in out],
            )
            if self._ledger_db is not None:
                c.executemany(
                    f"INSERT INTO {self._ledger_db}.ledger(day, job, row_key, micros) VALUES (?, ?, ?, ?)",
                    [(day, self._ledger_job, cl.row_key, price) for cl in out],
                )
            self.set("batch_seq", batch, c)
            return out

    def _pick(
        self,
        c: sqlite3.Connection,
        epoch: int,
        limit: int,
        prices: dict[str, int],
        budget: int | None,
        daily_budget: int | None,
        spent: int,
        today: int,
        now: float,
    ) -> tuple[str, int, list[int]] | None:
        """The rows the claim takes: (processor, its price, row ids), or None when what is left of the budget
        belongs to cheaper rows still waiting out a backoff, or no row is ready. See `claim`."""
        kept = 0  # reserved for cheaper rows that may not be sent yet (backoff)
        for processor in by_price(prices):
            if not self._pending_on(epoch, processor):
                continue
            price = prices[processor]
            fit = limit
            if budget is not None:
                fit = min(fit, runs_that_fit(price, spent + kept, budget))
                if fit <= 0 and not kept:
                    raise BudgetExceeded(
                        f"budget reached: {spent / 1e6:.4f} USD of {budget / 1e6:.4f} USD spent or reserved"
                    )
            if daily_budget is not None:
                fit = min(fit, runs_that_fit(price, today + kept, daily_budget))
                if fit <= 0 and not kept:
                    raise DailyBudgetExceeded(daily_message(today, daily_budget, now))
            if fit <= 0:
                return None  # what is left belongs to cheaper rows still waiting out a backoff
            ready = (
                "epoch=? AND state='pending' AND processor=? AND solo=? AND waits=0 AND (next_at IS NULL OR next_at<=?)"
            )
            picked = (
                c.execute(
                    f"SELECT id FROM rows WHERE {ready} ORDER BY ordinal LIMIT 1", (epoch, processor, 1, now)
                ).fetchall()
                or c.execute(
                    f"SELECT id FROM rows WHERE {ready} ORDER BY ordinal LIMIT ?", (epoch, processor, 0, now, fit)
                ).fetchall()
            )
            if picked:
                return processor, price, [p[0] for p in picked]
            kept += price * self.pending_count(epoch, processor)
        return None

    def _serve(self, c: sqlite3.Connection, ids: list[int], serve: Serve, now: float) -> tuple[frozenset[int], int]:
        """Look the rows `ids` up in the shared cache; those it holds are done with its result. Returns (ids
        served, the cache's last entry number seen)."""
        keys: dict[int, tuple[str, str, str]] = {}
        for chunk in chunks(ids):
            marks = ",".join("?" * len(chunk))
            for i, in_h, spec_h, proc in c.execute(
                f"SELECT id, input_hash, spec_hash, processor FROM rows WHERE id IN ({marks})", chunk
            ):
                keys[i] = (in_h, spec_h, proc)
        found, seq = serve(sorted(set(keys.values())))
        hits = [(i, found[k]) for i, k in keys.items() if k in found]
        self._take(c, hits, now)
        return frozenset(i for i, _ in hits), seq

    def _take(self, c: sqlite3.Connection, hits: list[tuple[int, Cached]], now: float) -> None:
        """pending -> done for rows the shared cache holds a result for: the result is kept in `results`
        (origin 'cache', with the run id and completion time it had in the job that paid for it), and the
        row's waiting twins take it too."""
        if not hits:
            return
        c.executemany(
            "INSERT OR IGNORE INTO results(run_id, input_hash, spec_hash, processor, completed_at, result_json, "
            "row_ref, origin) SELECT ?, input_hash, spec_hash, processor, ?, ?, NULL, 'cache' FROM rows WHERE id=?",
            [(h.run_id, h.completed_at, h.result_json, i) for i, h in hits],
        )
        self._move(
            c,
            "UPDATE rows SET state='done', error=NULL, waits=0, reused='cache', run_id=?, run_input_hash=input_hash, "
            "run_spec_hash=spec_hash, run_processor=processor, submitted_at=NULL, finished_at=? "
            "WHERE id=? AND state='pending'",
            [(h.run_id, now, i) for i, h in hits],
            "take",
        )
        self.reused_moves += len(hits) + self._share(c, [i for i, _ in hits])

    def _share(self, c: sqlite3.Connection, leaders: list[int]) -> int:
        """Rows waiting on the runs of `leaders` (rows whose run just ended) take its outcome; returns how many."""
        if not self.dedupe or not leaders or not self.twins:
            return 0
        moved = 0
        for chunk in chunks(leaders):
            moved += c.execute(SHARE_SQL.format(ids=",".join("?" * len(chunk))), chunk).rowcount
        return moved

    def serve_pending(self, epoch: int, serve: Serve, now: float, chunk: int = 500) -> int:
        """Every pending row (none waiting for a twin) the shared cache holds a result for: done with it, in
        short transactions of `chunk` rows (before the first claim). Returns the rows that took one."""
        last = -1
        before = self.reused_moves
        while True:
            with self.tx() as c:
                got = c.execute(
                    "SELECT id, ordinal FROM rows WHERE epoch=? AND state='pending' AND waits=0 AND ordinal>? "
                    "ORDER BY ordinal LIMIT ?",
                    (epoch, last, chunk),
                ).fetchall()
                if not got:
                    return self.reused_moves - before
                last = got[-1][1]
                self._serve(c, [g[0] for g in got], serve, now)

    def unstick(self, epoch: int) -> bool:
        """Decide again for every waiting row whether it still waits (a safety net: a row whose twins all ended
        without giving it an outcome becomes claimable). Returns whether a row may be claimed now."""
        if not self.dedupe:
            return False
        with self.tx() as c:
            c.execute(WAITS_SQL.format(scope="rows.epoch=:epoch AND rows.waits=1"), {"epoch": epoch})
        return self.has_pending(epoch)

    def waiting(self, epoch: int) -> int:
        """Pending rows that wait for a twin's run: they get an outcome without a run of their own."""
        if not self._has_column("rows", "waits"):
            return 0
        return self.conn.execute(
            "SELECT COUNT(*) FROM rows WHERE epoch=? AND state='pending' AND waits=1", (epoch,)
        ).fetchone()[0]

    def cached_pending(self, epoch: int, serve: Serve, chunk: int = 500) -> int:
        """How many pending rows (none waiting for a twin) the shared cache holds a result for (plan; reads only)."""
        last, hits = -1, 0
        while True:
            got = self.conn.execute(
                "SELECT ordinal, input_hash, spec_hash, processor FROM rows WHERE epoch=? AND state='pending' "
                "AND waits=0 AND ordinal>? ORDER BY ordinal LIMIT ?",
                (epoch, last, chunk),
            ).fetchall()
            if not got:
                return hits
            last = got[-1][0]
            keys = [(g[1], g[2], g[3]) for g in got]
            found, _ = serve(sorted(set(keys)))
            hits += sum(1 for k in keys if k in found)

    def _move(self, c: sqlite3.Connection, sql: str, params: list[tuple[Any, ...]], what: str) -> None:
        """Run one UPDATE per item; each must touch exactly one row, else TransitionError (rolled back)."""
        for p in params:
            if c.execute(sql, p).rowcount != 1:
                raise TransitionError(f"{what}: row {p[-2] if len(p) > 1 else p[0]} is not in the expected state")

    def mark_submitted(
        self, rows: list[tuple[str, int]], run_ids: list[str], batch: int, cursor: str | None, now: float
    ) -> None:
        """intent -> submitted for an add-runs reply: the rows (row_key, attempt) and the run ids the reply
        listed, in whatever order; which run is whose is learned from each run's metadata later."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='submitted', submitted_at=?, retries=0, rung=run_processor "
                "WHERE row_key=? AND attempts=? AND state='intent'",
                [(now, k, a) for k, a in rows],
                "mark_submitted",
            )
            processor = (  # one batch, one processor (claim)
                c.execute("SELECT run_processor FROM rows WHERE row_key=?", (rows[0][0],)).fetchone()[0]
                if rows
                else None
            )
            c.executemany(
                "INSERT OR IGNORE INTO runs(run_id, batch, cursor, created_at, state, processor) "
                "VALUES (?, ?, ?, ?, 'waiting', ?)",
                [(r, batch, cursor or "", now, processor) for r in run_ids],
            )

    def adopt(self, found: list[tuple[str, int, str, str]], now: float) -> None:
        """intent|unknown -> submitted for rows found in the group listing: (row_key, attempt, run_id, cursor).
        Here the pairing is proven: the listing showed the run with this row's metadata."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='submitted', run_id=?, submitted_at=?, retries=0, rung=run_processor "
                "WHERE row_key=? AND attempts=? AND state IN ('intent', 'unknown')",
                [(rid, now, k, a) for k, a, rid, _ in found],
                "adopt",
            )
            # a run already known (recorded while its row could not be named, or timed out) is waited for
            # again: its row is submitted now, and a row is never left between "recorded" and "waited for"
            c.executemany(
                "INSERT INTO runs(run_id, batch, cursor, created_at, state, processor) "
                "SELECT ?, COALESCE(batch, 0), ?, ?, 'waiting', run_processor FROM rows WHERE row_key=? "
                "ON CONFLICT(run_id) DO UPDATE SET state='waiting'",
                [(rid, cur, now, k) for k, _, rid, cur in found],
            )

    def release(
        self,
        rows: list[tuple[str, int]],
        now: float,
        next_at: float | None,
        error: str,
        max_retries: int,
        solo: bool = False,
        count_retry: bool = False,
    ) -> list[str]:
        """intent|unknown -> pending (or failed): no run was created for this attempt of these rows.
        Refunds the reservation. Only rows still at the given attempt move (a stale decision about an
        older attempt changes nothing). `count_retry` only for rejections of the row itself; a row
        rejected `max_retries` times becomes failed. Returns the keys that became failed."""
        inc = 1 if count_retry else 0
        failed: list[str] = []
        with self.tx() as c:
            for key, attempt in rows:
                hit = c.execute(
                    "SELECT retries FROM rows WHERE row_key=? AND attempts=? AND state IN ('intent', 'unknown')",
                    (key, attempt),
                ).fetchone()
                if hit is None:
                    raise TransitionError(f"release: row {key} attempt {attempt} is no longer in doubt")
                price = c.execute(
                    "SELECT micros, processor FROM spend WHERE row_key=? AND reason='reserve' ORDER BY id DESC LIMIT 1",
                    (key,),
                ).fetchone()
                c.execute(
                    "INSERT INTO spend(at, row_key, micros, reason, processor) VALUES (?, ?, ?, 'release', ?)",
                    (now, key, -price[0] if price else 0, price[1] if price else None),
                )
                self._ledger_refund(c, key)
                state = "failed" if hit[0] + inc >= max_retries else "pending"
                if state == "failed":
                    failed.append(key)
                c.execute(
                    "UPDATE rows SET state=?, retries=retries+?, next_at=?, solo=MAX(solo, ?), error=?, "
                    "finished_at=?, reused=NULL WHERE row_key=?",
                    (state, inc, next_at, int(solo), error, now, key),
                )
            if failed:  # the input itself was refused: its waiting twins share the failure
                self.reused_moves += self._share(c, self._ids(c, failed))
        return failed

    def _ids(self, c: sqlite3.Connection, keys: list[str]) -> list[int]:
        out: list[int] = []
        for chunk in chunks(keys):
            marks = ",".join("?" * len(chunk))
            out += [r[0] for r in c.execute(f"SELECT id FROM rows WHERE row_key IN ({marks})", chunk)]
        return out

    def mark_unknown(self, rows: list[tuple[str, int]], error: str) -> None:
        """intent -> unknown: the add-runs outcome is ambiguous; reconciliation decides."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='unknown', error=? WHERE row_key=? AND attempts=? AND state='intent'",
                [(error, k, a) for k, a in rows],
                "mark_unknown",
            )

    def unresolved(self) -> list[Unresolved]:
        rows = self.conn.execute(
            "SELECT row_key, row_ref, attempts, intent_at, batch FROM rows "
            "WHERE state IN ('intent', 'unknown') ORDER BY ordinal"
        ).fetchall()
        return [Unresolved(*r) for r in rows]

    # ---- polling ---------------------------------------------------------------------------
    def waiting_runs(self) -> list[tuple[str, int, str, float]]:
        """(run_id, batch, cursor, created_at) of every run whose outcome is still to be recorded."""
        return self.conn.execute("SELECT run_id, batch, cursor, created_at FROM runs WHERE state='waiting'").fetchall()

    def attribute(self, run_id: str, row_ref: str | None, attempt: int | None) -> tuple[str, int] | None:
        """The (row_ref, attempt) a finished run belongs to, from what its reply named, completed by what the
        journal knows: without a row, the row already paired with this run id (adopted, recorded or timed
        out); without a readable attempt, the named row's current attempt. None when neither is known."""
        if row_ref is not None and attempt is not None:
            return row_ref, attempt
        if row_ref is not None:
            hit = self.conn.execute("SELECT row_ref, attempts FROM rows WHERE row_ref=?", (row_ref,)).fetchone()
        else:
            hit = self.conn.execute("SELECT row_ref, attempts FROM rows WHERE run_id=?", (run_id,)).fetchone()
        return (hit[0], hit[1]) if hit else None

    def record(self, finished: list[Finished], now: float) -> tuple[int, list[str]]:
        """Store finished runs, each on the row its metadata names: submitted|timed_out|action_required ->
        done | failed.

        A completed result is always kept in `results` (it was paid for), even when its row has moved
        on; a row whose input or spec changed since goes back to pending. Returns (rows updated, run ids
        refused because their metadata names no row of this journal). Recording twice is harmless."""
        with self.tx() as c:
            # set-based: a batch of a thousand results is a handful of statements, not four per run
            c.execute(
                "CREATE TEMP TABLE IF NOT EXISTS fin (run_id TEXT, row_ref TEXT, attempt INTEGER, "
                "result_json TEXT, error TEXT)"
            )
            c.execute("DELETE FROM temp.fin")
            c.execute(EXCLUDED_SQL)
            c.executemany(
                "INSERT INTO temp.fin VALUES (?, ?, ?, ?, ?)",
                [(f.run_id, f.row_ref, f.attempt, f.result_json, f.error) for f in finished],
            )
            refused = [
                r[0]
                for r in c.execute(
                    "SELECT run_id FROM temp.fin WHERE row_ref IS NULL OR NOT EXISTS "
                    "(SELECT 1 FROM rows WHERE rows.row_ref=fin.row_ref)"
                )
            ]
            c.execute(
                "INSERT OR IGNORE INTO results(run_id, input_hash, spec_hash, processor, completed_at, result_json, "
                "row_ref) SELECT f.run_id, r.run_input_hash, r.run_spec_hash, r.run_processor, ?, f.result_json, "
                "r.row_ref FROM temp.fin f JOIN rows r ON r.row_ref=f.row_ref AND r.attempts=f.attempt "
                "WHERE f.result_json IS NOT NULL",
                (now,),
            )
            c.execute(
                "UPDATE runs SET state='recorded', finished_at=COALESCE(finished_at, ?) "
                "WHERE run_id IN (SELECT run_id FROM temp.fin)",
                (now,),
            )
            before = c.total_changes
            # the first result per row wins (a repeated event or listing changes nothing)
            c.execute(
                "UPDATE rows SET state=CASE WHEN f.result_json IS NULL THEN 'failed' "
                "WHEN rows.row_key IN (SELECT row_key FROM temp.excluded) THEN 'skipped' "
                "WHEN rows.run_input_hash=rows.input_hash AND rows.run_spec_hash=rows.spec_hash AND "
                "rows.run_processor=rows.processor THEN 'done' ELSE 'pending' END, run_id=f.run_id, "
                "error=f.error, finished_at=?, reused=NULL FROM (SELECT row_ref, attempt, MIN(rowid) AS k FROM temp.fin "
                "GROUP BY row_ref, attempt) g JOIN temp.fin f ON f.rowid=g.k "
                "WHERE rows.row_ref=g.row_ref AND rows.attempts=g.attempt AND rows.state IN ('submitted', "
                "'timed_out', 'action_required')",
                (now,),
            )
            updated = c.total_changes - before
            if self.dedupe:  # rows waiting on these runs take their outcome in this same transaction
                leaders = [
                    r[0]
                    for r in c.execute(
                        "SELECT DISTINCT r.id FROM temp.fin f JOIN rows r ON r.row_ref=f.row_ref AND r.attempts=f.attempt"
                    )
                ]
                self.reused_moves += self._share(c, leaders)
            c.execute("DELETE FROM temp.fin")
        return updated, refused

    def time_out(self, run_id: str, row_ref: str | None, attempt: int | None, now: float) -> bool:
        """submitted -> timed_out: the API says this run is still active after row_timeout_s.
        The run stays known (--retry-failed asks for it again instead of paying again)."""
        with self.tx() as c:
            c.execute("UPDATE runs SET state='timed_out' WHERE run_id=? AND state='waiting'", (run_id,))
            if row_ref is None or attempt is None:
                return False
            n = c.execute(
                "UPDATE rows SET state='timed_out', run_id=?, finished_at=?, error='still running at the "
                "API after row_timeout_s; the run may still finish and be billed (the API has no cancel): "
                "--retry-failed collects it without paying again' WHERE row_ref=? AND attempts=? AND "
                "state='submitted'",
                (run_id, now, row_ref, attempt),
            ).rowcount
            if n == 1 and self.dedupe:  # its waiting twins share the time-out (one run, still at the API)
                hit = c.execute("SELECT id FROM rows WHERE row_ref=?", (row_ref,)).fetchone()
                self.reused_moves += self._share(c, [hit[0]])
        return n == 1

    def hold(self, run_id: str, row_ref: str, attempt: int, message: str, now: float) -> bool:
        """submitted -> action_required: the run waits for an action at the API while no run of the job is
        active. It stays known (`held`): the next run of the job asks for it again before sending anything."""
        with self.tx() as c:
            c.execute("UPDATE runs SET state='held' WHERE run_id=? AND state='waiting'", (run_id,))
            n = c.execute(
                "UPDATE rows SET state='action_required', run_id=?, finished_at=?, error=? WHERE row_ref=? AND "
                "attempts=? AND state='submitted'",
                (run_id, now, message, row_ref, attempt),
            ).rowcount
        return n == 1

    def recheck_held(self) -> int:
        """action_required -> submitted, at the start of a run: their runs are waited for again (the account
        may have acted since). Returns the rows moved."""
        with self.tx() as c:
            n = c.execute("UPDATE rows SET state='submitted' WHERE state='action_required'").rowcount
            c.execute(
                "UPDATE runs SET state='waiting' WHERE state='held' AND run_id IN "
                "(SELECT run_id FROM rows WHERE state='submitted')"
            )
        return n

    def orphaned_submitted(self) -> list[tuple[str, int]]:
        """Submitted rows no waiting run can belong to any more (every run was attributed elsewhere)."""
        if self.conn.execute("SELECT 1 FROM runs WHERE state='waiting' LIMIT 1").fetchone():
            return []
        return self.conn.execute("SELECT row_key, attempts FROM rows WHERE state='submitted'").fetchall()

    def unknown_from_submitted(self, rows: list[tuple[str, int]], error: str) -> None:
        """submitted -> unknown: no run can be shown to be this row's; reconciliation looks for it by metadata."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='unknown', error=? WHERE row_key=? AND attempts=? AND state='submitted'",
                [(error, k, a) for k, a in rows],
                "unknown_from_submitted",
            )

    # ---- the pilot (job.pilot_job) ------------------------------------------------------------
    def pilot_candidates(self, epoch: int) -> list[tuple[str, str, str]]:
        """(row_key, input_hash, spec_hash) of the rows a pilot may sample, in input order: the rows to research
        (not skipped by `[input] where`); with dedupe, the first row of each distinct input (the one claimed)."""
        seen: set[tuple[str, str]] = set()
        out = []
        for key, in_h, spec_h in self.conn.execute(
            "SELECT row_key, input_hash, spec_hash FROM rows WHERE epoch=? AND state!='skipped' ORDER BY ordinal",
            (epoch,),
        ):
            if self.dedupe and (in_h, spec_h) in seen:
                continue
            seen.add((in_h, spec_h))
            out.append((key, in_h, spec_h))
        return out

    def hold_out(self, epoch: int, keep: Iterable[str]) -> int:
        """For a pilot's pass: every pending row of `epoch` whose key is not in `keep` becomes skipped, so only the
        sample is claimed; in the same transaction the seeding's fingerprint is forgotten, so the next run seeds
        the input again (a skipped row not excluded by `[input] where` is pending again then). Returns how many.
        How many rows of `epoch` are held out is kept (`held_out`): they are not finished, only set aside."""
        with self.tx() as c:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS pilot_keep (row_key TEXT PRIMARY KEY)")
            c.execute("DELETE FROM pilot_keep")
            c.executemany("INSERT OR IGNORE INTO pilot_keep(row_key) VALUES (?)", [(k,) for k in keep])
            n = c.execute(
                "UPDATE rows SET state='skipped', waits=0 WHERE epoch=? AND state='pending' "
                "AND row_key NOT IN (SELECT row_key FROM pilot_keep)",
                (epoch,),
            ).rowcount
            c.execute("DELETE FROM pilot_keep")
            c.execute("DELETE FROM meta WHERE k='seed_fingerprint'")
            before = self.held_out(epoch)
            c.execute(
                "INSERT OR REPLACE INTO meta(k, v) VALUES ('pilot_held_out', ?)",
                (json.dumps({"epoch": epoch, "rows": before + int(n)}),),
            )
        return int(n)

    def held_out(self, epoch: int) -> int:
        """How many of `epoch`'s skipped rows a pilot held out (hold_out): rows to research that the next seeding
        (a new epoch) makes pending again, so 0 for any other epoch."""
        held = self.get("pilot_held_out")
        return int(held["rows"]) if isinstance(held, dict) and held.get("epoch") == epoch else 0

    def pilot_runs(self, run_ids: Iterable[str]) -> dict[str, tuple[str, str, float | None]]:
        """run id -> (processor, result JSON, latency in seconds: from the run's creation to its result being
        recorded, None when this journal did not create it) for the results this journal holds."""
        out: dict[str, tuple[str, str, float | None]] = {}
        for part in chunks(sorted(set(run_ids)), 500):
            marks = ",".join("?" * len(part))
            for rid, proc, res, created, finished in self.conn.execute(
                "SELECT r.run_id, r.processor, r.result_json, u.created_at, u.finished_at FROM results r "
                f"LEFT JOIN runs u ON u.run_id = r.run_id WHERE r.run_id IN ({marks})",
                part,
            ):
                lat = max(0.0, finished - created) if created is not None and finished is not None else None
                out[rid] = (proc, res, lat)
        return out

    # ---- reuse (reuse.py asks; this journal answers) ----------------------------------------
    def results_for_keys(
        self, keys: list[tuple[str, str, str]], fresh_after: float | None
    ) -> dict[tuple[str, str, str], str]:
        """(input hash, spec hash, processor) -> run id of the newest result this journal holds for it (completed
        at or after `fresh_after`)."""
        out: dict[tuple[str, str, str], str] = {}
        for part in chunks(keys, 300):
            marks = ",".join("(?, ?, ?)" for _ in part)
            for in_h, spec_h, proc, run_id, _ in self.conn.execute(
                "SELECT input_hash, spec_hash, processor, run_id, MAX(completed_at) FROM results WHERE "
                f"(input_hash, spec_hash, processor) IN (VALUES {marks}) AND completed_at >= ? GROUP BY 1, 2, 3",
                (*[v for k in part for v in k], fresh_after if fresh_after is not None else float("-inf")),
            ):
                out[(in_h, spec_h, proc)] = run_id
        return out

    def own_results_after(self, rowid: int, limit: int) -> list[tuple[int, str, str, str, str, float, str]]:
        """(rowid, input hash, spec hash, processor, run id, completed at, result JSON) of results this journal paid
        for (not those served from the shared cache) after `rowid`, oldest first: what is published to the cache."""
        if not self._has_column("results", "origin"):
            return []
        return self.conn.execute(
            "SELECT rowid, input_hash, spec_hash, processor, run_id, completed_at, result_json FROM results "
            "WHERE rowid > ? AND origin IS NULL ORDER BY rowid LIMIT ?",
            (rowid, limit),
        ).fetchall()

    def reuse_counts(self, epoch: int) -> dict[str, Any]:
        """For the report: rows that took a twin's run (per processor), rows whose outcome came from the shared
        cache and the cache's results used (per processor), rows skipped by `[input] where`, distinct inputs
        researched. {} for a read-only view of a journal from before reuse."""
        if not self._has_column("rows", "reused"):
            return {}
        twin = dict(
            self.conn.execute(
                "SELECT processor, COUNT(*) FROM rows WHERE epoch=? AND reused='twin' AND state IN "
                "('done', 'failed', 'timed_out') GROUP BY processor",
                (epoch,),
            )
        )
        cache_rows = self.conn.execute(
            "SELECT COUNT(*) FROM rows WHERE epoch=? AND reused='cache' AND state='done'", (epoch,)
        ).fetchone()[0]
        cache_results = dict(
            self.conn.execute("SELECT processor, COUNT(*) FROM results WHERE origin='cache' GROUP BY processor")
        )
        skipped = self.conn.execute("SELECT COUNT(*) FROM rows WHERE epoch=? AND state='skipped'", (epoch,)).fetchone()[
            0
        ]
        distinct = self.conn.execute(
            "SELECT COUNT(DISTINCT input_hash) FROM rows WHERE epoch=? AND state!='skipped'", (epoch,)
        ).fetchone()[0]
        return {
            "twin": twin,
            "cache_rows": cache_rows,
            "cache_results": cache_results,
            "skipped": skipped,
            "distinct_inputs": distinct,
        }

    # ---- reading back ----------------------------------------------------------------------
    def counts(self, epoch: int | None = None) -> dict[str, int]:
        if epoch is None:
            epoch = self.get("epoch", 0)
        return dict(self.conn.execute("SELECT state, COUNT(*) FROM rows WHERE epoch=? GROUP BY state", (epoch,)))

    def write_state(self) -> list[Any]:
        """A cheap summary that changes whenever anything the output shows changes."""
        epoch = self.get("epoch", 0)
        row = self.conn.execute(
            "SELECT COUNT(*), MAX(intent_at), MAX(submitted_at), MAX(finished_at), SUM(attempts) "
            "FROM rows WHERE epoch=?",
            (epoch,),
        ).fetchone()
        verdicts = self.conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        return [epoch, *row, verdicts]

    def forget_remote(self) -> list[int]:
        """The task group is gone (a fresh emulator): rows that were in flight there go back to pending.

        Only ever used for emulated journals, where no money was involved. Returns the price (micros)
        reserved for each row reset: what creating their runs again costs.
        """
        prices: list[int] = []
        with self.tx() as c:
            keys = [
                r[0]
                for r in c.execute(
                    "SELECT row_key FROM rows WHERE state IN ('intent','unknown','submitted','action_required')"
                )
            ]
            for k in keys:
                price = c.execute(
                    "SELECT micros, processor FROM spend WHERE row_key=? AND reason='reserve' ORDER BY id DESC LIMIT 1",
                    (k,),
                ).fetchone()
                prices.append(price[0] if price else 0)
                c.execute(
                    "INSERT INTO spend(at, row_key, micros, reason, processor) VALUES (?, ?, ?, 'release', ?)",
                    (time.time(), k, -prices[-1], price[1] if price else None),
                )
                self._ledger_refund(c, k)
            c.execute(
                "UPDATE rows SET state='pending', run_id=NULL, next_at=NULL "
                "WHERE state IN ('intent','unknown','submitted','action_required')"
            )
            c.execute("DELETE FROM runs WHERE state IN ('waiting', 'timed_out', 'held')")
            c.execute("DELETE FROM meta WHERE k IN ('taskgroup_id', 'events_cursor')")
        return prices
