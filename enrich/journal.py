"""The job journal: one SQLite file per job, the only module that imports sqlite3.

Row states (the one place they are written down):

    pending ──claim──> intent ──2xx──> submitted ──completed──> done
       ^                 │ │                │  └───failed────────> failed
       │   safe failure  │ │ lost/ambiguous │  └──row_timeout_s──> timed_out
       ├─────────────────┘ v                │
       │   confirmed     unknown ──found in the group listing──> submitted
       └───missing───────┘
    done/failed/timed_out ──input or task spec changed, refresh due, --retry-failed──> pending

`intent` is committed, with its budget reservation, *before* the request is sent; so
after any crash every row that might have a paid run is `intent`/`unknown`/`submitted`, and
reconciliation (reconcile.py) settles it against the task group's run listing before
anything is resubmitted. Money is integer micro-dollars in the append-only `spend` table:
+price when a run is reserved, -price when it is proven never created.

Settings follow reliability.md 2.3: WAL, synchronous=FULL, one writer connection with
explicit BEGIN IMMEDIATE, short transactions never held across network awaits, and an
exclusive flock on `<journal>.lock` so a second enrich on the same journal stops at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enrich.errors import BudgetExceeded, JournalError

SCHEMA_VERSION = 1
IN_FLIGHT = ("intent", "unknown", "submitted")
TERMINAL = ("done", "failed", "timed_out")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
  row_key        TEXT PRIMARY KEY,   -- canonical JSON array of the key column values
  row_ref        TEXT NOT NULL,      -- sha256(job_id, row_key)[:24], sent as run metadata enrich_row
  ordinal        INTEGER NOT NULL,   -- 0-based position in the latest input
  line           INTEGER NOT NULL,   -- line (CSV) or row number (Parquet) in the latest input
  epoch          INTEGER NOT NULL,   -- seeding generation that last saw this row
  row_json       TEXT NOT NULL,      -- every input column, JSON array in meta 'columns' order
  input_json     TEXT NOT NULL,      -- the task input object (configured columns only)
  input_hash     TEXT NOT NULL,
  spec_hash      TEXT NOT NULL,
  state          TEXT NOT NULL,      -- pending | intent | unknown | submitted | done | failed | timed_out
  attempts       INTEGER NOT NULL DEFAULT 0,  -- runs ever intended for this row: metadata enrich_try
  retries        INTEGER NOT NULL DEFAULT 0,  -- consecutive safe failures of the current research
  batch          INTEGER,            -- submission batch of the current attempt
  run_id         TEXT,
  run_cursor     TEXT,               -- runs-stream cursor before this row's batch ('' = group start)
  run_input_hash TEXT,               -- input_hash the current run was made from
  run_spec_hash  TEXT,
  next_at        REAL,               -- not before this time (backoff after a safe failure)
  solo           INTEGER NOT NULL DEFAULT 0,  -- 1 = submit alone (its batch got a 422)
  intent_at      REAL,
  submitted_at   REAL,
  finished_at    REAL,
  result_json    TEXT,               -- raw {run, output} JSON as the API sent it
  error          TEXT
);
CREATE INDEX IF NOT EXISTS rows_state ON rows(state, epoch);
CREATE INDEX IF NOT EXISTS rows_queue ON rows(epoch, state, solo, ordinal);   -- claim: next pending rows in order
CREATE INDEX IF NOT EXISTS rows_order ON rows(epoch, ordinal);
CREATE INDEX IF NOT EXISTS rows_run ON rows(run_id);
CREATE TABLE IF NOT EXISTS spend (
  id INTEGER PRIMARY KEY, at REAL NOT NULL, row_key TEXT NOT NULL,
  micros INTEGER NOT NULL,            -- +price reserved, -price released
  reason TEXT NOT NULL                -- reserve | release
);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, at REAL NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL);
"""


@dataclass
class Claimed:
    row_key: str
    row_ref: str
    attempt: int
    input: Any


@dataclass
class Unresolved:
    row_key: str
    row_ref: str
    attempt: int
    intent_at: float
    batch: int | None


class Journal:
    """A job journal. Open with `Journal.open(path)`; a read-only view with `readonly=True`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, lock_fd: int | None):
        self.conn, self.path, self._lock_fd = conn, path, lock_fd
        self.readonly = False
        self.last_seed_counts: dict[str, int] = {}

    # ---- opening, locking --------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> Journal:
        if str(path) == ":memory:":   # scratch journal for `enrich plan` on a new job
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.executescript(SCHEMA)
            return cls(conn, Path(":memory:"), None)
        path = Path(path)
        if readonly:
            if not path.exists():
                raise JournalError(f"{path}: no such journal")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5)
            view = cls(conn, path, None)
            view.readonly = True
            return view
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalError(f"{path}: journal is in use by another enrich process; "
                               "wait for it to finish or stop it (its progress is kept)") from None
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # created 0600: it may hold PII
        os.close(fd)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=5, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA cache_size=-32768")   # 32 MiB: keeps big journals' B-trees in memory
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"{path}: journal was written by a newer enrich (schema {version})")
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            os.close(lock_fd)
            raise JournalError(f"{path}: not a usable journal ({exc})") from None
        return cls(conn, path, lock_fd)

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
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

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

    # ---- seeding -------------------------------------------------------------------------
    def seed(self, batches: Iterable[list[tuple[str, str, int, int, str, str, str, str]]], epoch: int,
             refresh_before: float | None, retry_failed: bool, dry: bool = False,
             meta: dict[str, Any] | None = None) -> None:
        """Record the current input: one transaction for the whole file, rolled back on any error.

        Each item is (row_key, row_ref, ordinal, line, row_json, input_json, input_hash, spec_hash).
        A row whose completed result matches its input and spec (and is fresher than
        `refresh_before`) stays done; in-flight rows stay in flight; everything else is pending.
        Raises `DuplicateKey` when a key appears twice in this input. With `dry` the whole
        transaction is rolled back after counting (`last_seed_counts`), for `enrich plan`.
        """
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for batch in batches:
                keys = [r[0] for r in batch]
                if len(set(keys)) != len(keys):
                    seen: dict[str, int] = {}
                    for r in batch:
                        if r[0] in seen:
                            raise DuplicateKey(r[0], seen[r[0]], r[3])
                        seen[r[0]] = r[3]
                for chunk in _chunks(keys, 900):
                    marks = ",".join("?" * len(chunk))
                    hit = conn.execute(f"SELECT row_key, line FROM rows WHERE epoch=? AND row_key IN ({marks}) LIMIT 1",
                                       (epoch, *chunk)).fetchone()
                    if hit:
                        line2 = next(r[3] for r in batch if r[0] == hit[0])
                        raise DuplicateKey(hit[0], hit[1], line2)
                conn.executemany(_SEED_SQL, [(*r, epoch, refresh_before, int(retry_failed)) for r in batch])
            self.set("epoch", epoch, conn)
            for k, v in (meta or {}).items():
                self.set(k, v, conn)
            self.last_seed_counts = dict(conn.execute(
                "SELECT state, COUNT(*) FROM rows WHERE epoch=? GROUP BY state", (epoch,)))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("ROLLBACK" if dry else "COMMIT")

    # ---- submission ----------------------------------------------------------------------
    def spent_micros(self) -> int:
        return self.conn.execute("SELECT COALESCE(SUM(micros), 0) FROM spend").fetchone()[0]

    def has_pending(self, epoch: int, now: float | None = None) -> bool:
        """Is any row pending (and, with `now`, ready to be sent)? An index probe, not a count."""
        if now is None:
            sql, args = "SELECT 1 FROM rows WHERE epoch=? AND state='pending' LIMIT 1", (epoch,)
        else:
            sql = "SELECT 1 FROM rows WHERE epoch=? AND state='pending' AND (next_at IS NULL OR next_at<=?) LIMIT 1"
            args = (epoch, now)
        return self.conn.execute(sql, args).fetchone() is not None

    def in_flight_count(self, epoch: int, states: tuple[str, ...] | None = None) -> int:
        states = states or IN_FLIGHT
        marks = ",".join("?" * len(states))
        return self.conn.execute(f"SELECT COUNT(*) FROM rows WHERE epoch=? AND state IN ({marks})",
                                 (epoch, *states)).fetchone()[0]

    def next_retry_at(self, epoch: int) -> float | None:
        return self.conn.execute("SELECT MIN(next_at) FROM rows WHERE epoch=? AND state='pending'",
                                 (epoch,)).fetchone()[0]

    def claim(self, epoch: int, limit: int, price: int, budget: int | None, now: float,
              batch: int) -> list[Claimed]:
        """Reserve budget and mark up to `limit` pending rows `intent`, committed before any send.

        Solo rows (their batch was rejected) are claimed one at a time. Raises BudgetExceeded
        when not even one more run fits in the budget.
        """
        with self.tx() as c:
            solo = c.execute("SELECT row_key FROM rows WHERE epoch=? AND state='pending' AND solo=1 AND "
                             "(next_at IS NULL OR next_at<=?) ORDER BY ordinal LIMIT 1", (epoch, now)).fetchall()
            if solo:
                picked = solo
            else:
                picked = c.execute("SELECT row_key FROM rows WHERE epoch=? AND state='pending' AND solo=0 AND "
                                   "(next_at IS NULL OR next_at<=?) ORDER BY ordinal LIMIT ?",
                                   (epoch, now, limit)).fetchall()
            if not picked:
                return []
            if budget is not None:
                spent = c.execute("SELECT COALESCE(SUM(micros), 0) FROM spend").fetchone()[0]
                affordable = (budget - spent) // price if price else len(picked)
                if affordable <= 0:
                    raise BudgetExceeded(f"budget reached: {spent / 1e6:.4f} USD of {budget / 1e6:.4f} USD "
                                         "spent or reserved")
                picked = picked[:affordable]
            keys = [r[0] for r in picked]
            c.executemany("UPDATE rows SET state='intent', attempts=attempts+1, batch=?, intent_at=?, run_id=NULL, "
                          "run_cursor=NULL, run_input_hash=input_hash, run_spec_hash=spec_hash, error=NULL "
                          "WHERE row_key=?", [(batch, now, k) for k in keys])
            c.executemany("INSERT INTO spend(at, row_key, micros, reason) VALUES (?, ?, ?, 'reserve')",
                          [(now, k, price) for k in keys])
            out = []
            for chunk in _chunks(keys, 900):
                marks = ",".join("?" * len(chunk))
                rows = c.execute(f"SELECT row_key, row_ref, attempts, input_json FROM rows WHERE row_key IN ({marks})",
                                 chunk).fetchall()
                by_key = {r[0]: r for r in rows}
                out.extend(Claimed(k, by_key[k][1], by_key[k][2], json.loads(by_key[k][3])) for k in chunk)
            self.set("batch_seq", batch, c)
            return out

    def mark_submitted(self, pairs: list[tuple[str, str]], run_cursor: str | None, now: float) -> None:
        """The add-runs reply arrived: (row_key, run_id) in input order."""
        with self.tx() as c:
            c.executemany("UPDATE rows SET state='submitted', run_id=?, run_cursor=?, submitted_at=?, retries=0 "
                          "WHERE row_key=? AND state IN ('intent', 'unknown')",
                          [(rid, run_cursor or "", now, key) for key, rid in pairs])

    def release(self, keys: list[str], now: float, next_at: float | None, error: str, max_retries: int,
                solo: bool = False, count_retry: bool = True) -> None:
        """No run was created for these rows: refund the reservation and make them pending again.

        Rows that have now failed `max_retries` times in a row become `failed` instead.
        """
        with self.tx() as c:
            c.executemany("INSERT INTO spend(at, row_key, micros, reason) "
                          "SELECT ?, row_key, -(SELECT micros FROM spend s WHERE s.row_key=rows.row_key AND "
                          "s.reason='reserve' ORDER BY id DESC LIMIT 1), 'release' FROM rows WHERE row_key=? AND "
                          "state IN ('intent', 'unknown')", [(now, k) for k in keys])
            inc = 1 if count_retry else 0
            c.executemany("UPDATE rows SET state=CASE WHEN retries+? >= ? THEN 'failed' ELSE 'pending' END, "
                          "retries=retries+?, next_at=?, solo=MAX(solo, ?), error=?, finished_at=? "
                          "WHERE row_key=? AND state IN ('intent', 'unknown')",
                          [(inc, max_retries, inc, next_at, int(solo), error, now, k) for k in keys])

    def fail_unsent(self, keys: list[str], now: float, error: str) -> None:
        """A permanent rejection (422/400) of a single-row batch: refund, mark failed."""
        self.release(keys, now, None, error, max_retries=0)

    def mark_unknown(self, keys: list[str], error: str) -> None:
        with self.tx() as c:
            c.executemany("UPDATE rows SET state='unknown', error=? WHERE row_key=? AND state='intent'",
                          [(error, k) for k in keys])

    def unresolved(self) -> list[Unresolved]:
        rows = self.conn.execute("SELECT row_key, row_ref, attempts, intent_at, batch FROM rows "
                                 "WHERE state IN ('intent', 'unknown') ORDER BY ordinal").fetchall()
        return [Unresolved(*r) for r in rows]

    # ---- polling ---------------------------------------------------------------------------
    def submitted(self) -> list[tuple[str, str, str, float]]:
        """(run_id, row_key, run_cursor, submitted_at) of every row waiting for its run."""
        return self.conn.execute("SELECT run_id, row_key, run_cursor, submitted_at FROM rows "
                                 "WHERE state='submitted'").fetchall()

    def submitted_ids(self, run_ids: set[str]) -> set[str]:
        """Which of these runs are still waiting for their result in the journal."""
        out: set[str] = set()
        ids = list(run_ids)
        for chunk in _chunks(ids, 900):
            marks = ",".join("?" * len(chunk))
            out.update(r[0] for r in self.conn.execute(
                f"SELECT run_id FROM rows WHERE state='submitted' AND run_id IN ({marks})", chunk))
        return out

    def record(self, done: list[tuple[str, str]], failed: list[tuple[str, str]], now: float) -> int:
        """Store finished runs: done = (run_id, raw result JSON), failed = (run_id, error text).

        A result whose row has since changed input or spec is kept but the row goes back to
        pending, to be researched again. Returns the number of rows updated.
        """
        with self.tx() as c:
            before = c.total_changes
            c.executemany("UPDATE rows SET state=CASE WHEN run_input_hash=input_hash AND run_spec_hash=spec_hash "
                          "THEN 'done' ELSE 'pending' END, result_json=?, error=NULL, finished_at=? "
                          "WHERE run_id=? AND state='submitted'", [(res, now, rid) for rid, res in done])
            c.executemany("UPDATE rows SET state='failed', error=?, finished_at=? WHERE run_id=? AND state='submitted'",
                          [(err, now, rid) for rid, err in failed])
            return c.total_changes - before

    def time_out(self, older_than: float, now: float) -> list[str]:
        """Rows submitted before `older_than` and still waiting become timed_out; returns their run ids."""
        with self.tx() as c:
            ids = [r[0] for r in c.execute("SELECT run_id FROM rows WHERE state='submitted' AND submitted_at < ?",
                                           (older_than,))]
            c.execute("UPDATE rows SET state='timed_out', finished_at=?, error='no result within row_timeout_s; "
                      "the run may still finish and be billed (the API has no cancel)' "
                      "WHERE state='submitted' AND submitted_at < ?", (now, older_than))
        return ids

    # ---- reading back ----------------------------------------------------------------------
    def counts(self, epoch: int | None = None) -> dict[str, int]:
        if epoch is None:
            epoch = self.get("epoch", 0)
        return dict(self.conn.execute("SELECT state, COUNT(*) FROM rows WHERE epoch=? GROUP BY state", (epoch,)))

    def iter_rows(self, epoch: int, chunk: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
        """(row_json, state, run_id, result_json, error, submitted_at, finished_at) in input order."""
        last = -1
        while True:
            rows = self.conn.execute("SELECT ordinal, row_json, state, run_id, result_json, error, submitted_at, "
                                     "finished_at FROM rows WHERE epoch=? AND ordinal>? ORDER BY ordinal LIMIT ?",
                                     (epoch, last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [r[1:] for r in rows]


class DuplicateKey(JournalError):
    """The same key appears twice in one input file."""

    def __init__(self, key: str, first_line: int, line: int):
        super().__init__(f"duplicate key {key} (first at line {first_line})")
        self.key, self.first_line, self.line = key, first_line, line


_SEED_SQL = """
INSERT INTO rows (row_key, row_ref, ordinal, line, row_json, input_json, input_hash, spec_hash, epoch, state)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')
ON CONFLICT(row_key) DO UPDATE SET
  ordinal=excluded.ordinal, line=excluded.line, epoch=excluded.epoch, row_json=excluded.row_json,
  input_json=excluded.input_json, input_hash=excluded.input_hash, spec_hash=excluded.spec_hash,
  state = CASE
    WHEN rows.state IN ('intent', 'unknown', 'submitted') THEN rows.state
    WHEN rows.state = 'done' AND rows.run_input_hash = excluded.input_hash
         AND rows.run_spec_hash = excluded.spec_hash AND (?10 IS NULL OR rows.finished_at >= ?10) THEN 'done'
    WHEN rows.state IN ('failed', 'timed_out') AND ?11 = 0 AND rows.run_input_hash = excluded.input_hash
         AND rows.run_spec_hash = excluded.spec_hash THEN rows.state
    ELSE 'pending' END,
  retries = CASE WHEN rows.state = 'pending' OR rows.state IN ('done', 'failed', 'timed_out') THEN 0
            ELSE rows.retries END,
  solo = 0, next_at = NULL
"""


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def forget_remote(journal: Journal) -> int:
    """The task group is gone (a fresh emulator): rows that were in flight there go back to pending.

    Only ever used for emulated journals, where no money was involved. Returns the rows reset.
    """
    with journal.tx() as c:
        keys = [r[0] for r in c.execute("SELECT row_key FROM rows WHERE state IN ('intent','unknown','submitted')")]
        c.executemany("INSERT INTO spend(at, row_key, micros, reason) SELECT ?, row_key, -(SELECT micros FROM spend s "
                      "WHERE s.row_key=rows.row_key AND s.reason='reserve' ORDER BY id DESC LIMIT 1), 'release' "
                      "FROM rows WHERE row_key=?", [(time.time(), k) for k in keys])
        c.execute("UPDATE rows SET state='pending', run_id=NULL, next_at=NULL WHERE state IN ('intent','unknown','submitted')")
        c.execute("DELETE FROM meta WHERE k IN ('taskgroup_id', 'events_cursor')")
    return len(keys)
