"""The journal's SQL: schema, seeding statements and migrations (run by journal.py, the one sqlite3 user).

Kept apart so journal.py reads as its transitions. Nothing here opens a database: every function
takes the connection journal.py owns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal, get_args

from enrich.processors import PROCESSORS

SCHEMA_VERSION = 2
# A row's state: the one vocabulary (journal.py draws the transitions). Nothing else spells them.
# `skipped`: the row does not match `[input] where`, so it is not researched (and never claimed).
RowState = Literal[
    "pending", "intent", "unknown", "submitted", "done", "failed", "timed_out", "action_required", "skipped"
]
ROW_STATES: tuple[RowState, ...] = get_args(RowState)
IN_FLIGHT: tuple[RowState, ...] = ("intent", "unknown", "submitted")  # a paid run may exist
# finished for this run of the job; an action_required row's run is asked again by the next run
TERMINAL: tuple[RowState, ...] = ("done", "failed", "timed_out", "action_required")
# Where a row's current outcome came from when it is not its own run (rows.reused): the reuse vocabulary.
Reused = Literal["twin", "cache", "journal"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
  id             INTEGER PRIMARY KEY,
  row_key        TEXT NOT NULL UNIQUE,   -- canonical JSON array of the key column values
  row_ref        TEXT NOT NULL UNIQUE,   -- sha256(job_id, row_key)[:24], sent as run metadata enrich_row
  ordinal        INTEGER NOT NULL,   -- 0-based position in the latest input
  line           INTEGER NOT NULL,   -- line (CSV) or row number (Parquet) in the latest input
  epoch          INTEGER NOT NULL,   -- seeding generation that last saw this row
  row_json       TEXT NOT NULL,      -- every input column, JSON array in meta 'columns' order
  input_json     TEXT NOT NULL,      -- the task input object (configured columns only)
  input_hash     TEXT NOT NULL,
  spec_hash      TEXT NOT NULL,      -- task spec and run options (not the processor)
  processor      TEXT NOT NULL,      -- processor of the row's next run
  state          TEXT NOT NULL,      -- pending | intent | unknown | submitted | done | failed | timed_out
                                     -- | action_required | skipped
  attempts       INTEGER NOT NULL DEFAULT 0,  -- runs ever intended for this row: metadata enrich_try
  retries        INTEGER NOT NULL DEFAULT 0,  -- rejections of this row itself (not of the API)
  batch          INTEGER,            -- submission batch of the current attempt
  run_id         TEXT,               -- the run proven (by its metadata) to belong to this attempt
  run_input_hash TEXT,               -- input_hash, spec_hash and processor the current run was made from
  run_spec_hash  TEXT,
  run_processor  TEXT,
  next_at        REAL,               -- not before this time (backoff after a safe failure)
  solo           INTEGER NOT NULL DEFAULT 0,  -- 1 = submit alone (its batch got a 422)
  intent_at      REAL,
  submitted_at   REAL,
  finished_at    REAL,
  rung           TEXT,               -- strongest processor a run was created on for this input/spec (escalation)
  error          TEXT,
  waits          INTEGER NOT NULL DEFAULT 0,  -- 1 = pending, but a twin's run (same input, spec, processor) gives its outcome
  reused         TEXT,               -- NULL: the outcome is its own run's; twin | cache | journal: whose it took
  cache_seq      INTEGER             -- at its claim: the shared cache's last entry seen (none held this input)
);
DROP INDEX IF EXISTS rows_queue;   -- before the claim went cheapest processor first: (epoch, state, solo, ordinal)
CREATE INDEX IF NOT EXISTS rows_tier ON rows(epoch, state, processor, solo, ordinal);  -- claim: per processor, in order
CREATE INDEX IF NOT EXISTS rows_order ON rows(epoch, ordinal);
CREATE INDEX IF NOT EXISTS rows_state ON rows(state);
CREATE INDEX IF NOT EXISTS rows_input ON rows(input_hash);  -- twins: rows with the same task input (dedupe)
CREATE TABLE IF NOT EXISTS runs (
  run_id       TEXT PRIMARY KEY,     -- every run an add-runs reply or a listing showed us
  batch        INTEGER NOT NULL,
  cursor       TEXT NOT NULL,        -- runs-stream cursor before its batch ('' = group start)
  created_at   REAL NOT NULL,
  state        TEXT NOT NULL,        -- waiting | recorded | timed_out | held (action_required: asked again next run)
  processor    TEXT,                 -- processor it was created on (add_run_columns fills older journals')
  finished_at  REAL                  -- when its outcome was recorded (completed or failed)
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state);
CREATE TABLE IF NOT EXISTS results (
  run_id       TEXT PRIMARY KEY,
  input_hash   TEXT NOT NULL,
  spec_hash    TEXT NOT NULL,
  processor    TEXT NOT NULL,
  completed_at REAL NOT NULL,
  result_json  TEXT NOT NULL,        -- raw {run, output} JSON as the API sent it
  row_ref      TEXT,                 -- the row whose run it was (NULL: served from the cache, or an older journal)
  origin       TEXT                  -- NULL: paid by this journal; 'cache': served from the shared results cache
);
CREATE INDEX IF NOT EXISTS results_lookup ON results(input_hash, spec_hash, processor, completed_at);
CREATE TABLE IF NOT EXISTS spend (
  id INTEGER PRIMARY KEY, at REAL NOT NULL, row_key TEXT NOT NULL,
  micros INTEGER NOT NULL,            -- +price reserved, -price released
  reason TEXT NOT NULL,               -- reserve | release
  processor TEXT                      -- of the reserved run (a release repeats it); NULL only if unknowable
);
CREATE INDEX IF NOT EXISTS spend_row ON spend(row_key, id);   -- a release finds its reservation at once
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, at REAL NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (  -- append-only human review history
  id INTEGER PRIMARY KEY, at REAL NOT NULL, row_key TEXT NOT NULL, field TEXT NOT NULL,
  verdict TEXT NOT NULL,              -- accept | correct | reject
  corrected_json TEXT,                -- the reviewer's value (JSON), for correct
  reviewer TEXT NOT NULL, note TEXT NOT NULL,
  run_id TEXT,                        -- the run whose answer was reviewed
  input_hash TEXT NOT NULL,           -- the row's input then: a changed input makes the verdict stale
  previous_json TEXT                  -- the value shown to the reviewer
);
CREATE INDEX IF NOT EXISTS verdicts_row ON verdicts(row_key, id);
"""

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS {db}.ledger (  -- spend per UTC day, shared by the jobs that name this ledger
  id INTEGER PRIMARY KEY, day TEXT NOT NULL, job TEXT NOT NULL, row_key TEXT NOT NULL,
  micros INTEGER NOT NULL             -- +price reserved, -price released (on the reservation's day)
);
CREATE INDEX IF NOT EXISTS {db}.ledger_day ON ledger(day);
"""


SEED_SQL = """
INSERT INTO rows (row_key, row_ref, ordinal, line, row_json, input_json, input_hash, spec_hash, processor, epoch,
                  state)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?12)
ON CONFLICT(row_key) DO UPDATE SET
  ordinal=excluded.ordinal, line=excluded.line, epoch=excluded.epoch, row_json=excluded.row_json,
  input_json=excluded.input_json, input_hash=excluded.input_hash, spec_hash=excluded.spec_hash,
  processor = CASE WHEN rows.state IN ('intent', 'unknown', 'submitted', 'action_required') THEN rows.processor
                   ELSE excluded.processor END,
  rung = CASE WHEN rows.input_hash = excluded.input_hash AND rows.spec_hash = excluded.spec_hash THEN rows.rung
              ELSE NULL END,
  state = CASE
    WHEN rows.state IN ('intent', 'unknown', 'submitted', 'action_required') THEN rows.state
    WHEN ?12 = 'skipped' THEN 'skipped'
    WHEN rows.state IN ('failed', 'timed_out') AND rows.run_input_hash = excluded.input_hash
         AND rows.run_spec_hash = excluded.spec_hash AND rows.run_processor = excluded.processor THEN
         CASE WHEN ?11 = 0 THEN rows.state
              -- its own run is asked again; a twin's outcome (reused) waits for that twin instead
              WHEN rows.state = 'timed_out' AND rows.run_id IS NOT NULL AND rows.reused IS NULL THEN 'submitted'
              ELSE 'pending' END
    ELSE 'pending' END,
  retries = CASE WHEN rows.state IN ('intent', 'unknown', 'submitted', 'action_required') THEN rows.retries
                 ELSE 0 END,
  solo = 0, next_at = NULL, waits = 0
"""

# pending rows whose (input, spec, processor) already has a result in this journal: done, no new run. The newest
# result counts (not older than :fresh); without dedupe (:dedupe = 0) only the row's own runs, or results served
# from the shared cache, or those of a journal from before results named their row
REUSE_SQL = """
UPDATE rows SET state='done', error=NULL, waits=0, run_input_hash=rows.input_hash, run_spec_hash=rows.spec_hash,
  run_processor=rows.processor, run_id=s.run_id,
  reused=CASE WHEN s.origin='cache' THEN 'cache' WHEN s.row_ref IS NULL THEN 'journal'
              WHEN s.row_ref=rows.row_ref THEN NULL ELSE 'twin' END
FROM results s
WHERE rows.epoch=:epoch AND rows.state='pending' AND s.run_id=(
  SELECT r.run_id FROM results r WHERE r.input_hash=rows.input_hash AND r.spec_hash=rows.spec_hash
  AND r.processor=rows.processor AND (:fresh IS NULL OR r.completed_at >= :fresh)
  AND (:dedupe OR r.origin IS NOT NULL OR r.row_ref IS NULL OR r.row_ref=rows.row_ref)
  ORDER BY r.completed_at DESC LIMIT 1)
"""

# A pending row waits (is never claimed) while a twin (same task input, spec and processor) is in flight, or
# pending earlier in the input: that twin's run gives it its outcome (journal._share). Only pending rows in `scope`
# (an SQL condition on `rows`) are decided; the condition reads states and ordinals, never `waits`, so one statement
# decides a whole set. The `+` keeps SQLite on the input_hash index (by ordinal it would scan every row per row).
WAITS_SQL = """
UPDATE rows SET waits = CASE WHEN
  (rows.input_hash, rows.spec_hash, rows.processor) IN (
     SELECT run_input_hash, run_spec_hash, run_processor FROM rows
     WHERE state IN ('intent', 'unknown', 'submitted', 'action_required'))
  OR EXISTS (SELECT 1 FROM rows t WHERE t.input_hash=rows.input_hash AND t.spec_hash=rows.spec_hash
     AND t.processor=rows.processor AND +t.epoch=rows.epoch AND +t.state='pending' AND +t.ordinal<rows.ordinal)
  THEN 1 ELSE 0 END
WHERE rows.state='pending' AND {scope}
"""

# Row keys that `[input] where` left out at this connection's last seeding while their run was in flight: a result
# that comes for one makes it skipped, not done, so it is neither shown nor escalated (journal.record). Per
# connection (TEMP): after a crash the next seeding finds those rows finished and skips them itself.
EXCLUDED_SQL = "CREATE TEMP TABLE IF NOT EXISTS excluded (row_key TEXT PRIMARY KEY)"

# Rows waiting on a twin take the outcome of the twin's run (the leaders :ids just finished): its result (done), or
# its failure or time-out; values, basis and decisions follow from the shared result, the run id and times are its.
# The twin's rung becomes the run's processor, as if the run were its own (mark_submitted): a failed escalation run
# then counts as tried for every twin, so the fall-back keeps them all on the earlier answer and none climbs again.
SHARE_SQL = """
UPDATE rows SET
  state=CASE WHEN EXISTS (SELECT 1 FROM results s WHERE s.run_id=l.run_id) THEN 'done' ELSE l.state END,
  error=CASE WHEN EXISTS (SELECT 1 FROM results s WHERE s.run_id=l.run_id) THEN NULL ELSE l.error END,
  run_id=l.run_id, run_input_hash=l.run_input_hash, run_spec_hash=l.run_spec_hash, run_processor=l.run_processor,
  rung=l.run_processor, submitted_at=l.submitted_at, finished_at=l.finished_at, waits=0, reused='twin'
FROM rows l
WHERE l.id IN ({ids}) AND rows.id != l.id AND rows.waits=1 AND rows.state='pending'
  AND rows.input_hash=l.run_input_hash AND rows.spec_hash=l.run_spec_hash AND rows.processor=l.run_processor
  AND (l.state IN ('failed', 'timed_out') OR EXISTS (SELECT 1 FROM results s WHERE s.run_id=l.run_id))
"""


def migrate_v1(conn: Any) -> None:
    """Schema 1 -> 2: results move to their own table, runs get a table, rows an integer id and a processor.

    Spec hashes of schema 1 included the processor; `pipeline.prepare` renames them on first use
    (meta `legacy_spec_hash`), so nothing already paid for runs again."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        proc_row = conn.execute("SELECT v FROM meta WHERE k='processor'").fetchone()
        proc = json.loads(proc_row[0]) if proc_row else "lite-fast"
        conn.execute("ALTER TABLE rows RENAME TO rows_v1")
        for idx in ("rows_state", "rows_queue", "rows_tier", "rows_order", "rows_run"):
            conn.execute(f"DROP INDEX IF EXISTS {idx}")
        conn.executescript(SCHEMA.replace("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);", ""))
        conn.execute(
            "INSERT INTO rows(row_key, row_ref, ordinal, line, epoch, row_json, input_json, input_hash, spec_hash, "
            "processor, state, attempts, retries, batch, run_id, run_input_hash, run_spec_hash, run_processor, next_at, "
            "solo, intent_at, submitted_at, finished_at, error) SELECT row_key, row_ref, ordinal, line, epoch, row_json, "
            "input_json, input_hash, spec_hash, ?, state, attempts, retries, batch, run_id, run_input_hash, "
            "run_spec_hash, ?, next_at, solo, intent_at, submitted_at, finished_at, error FROM rows_v1 ORDER BY ordinal",
            (proc, proc),
        )
        conn.execute(
            "INSERT OR IGNORE INTO results(run_id, input_hash, spec_hash, processor, completed_at, result_json) "
            "SELECT run_id, run_input_hash, run_spec_hash, ?, COALESCE(finished_at, 0), result_json "
            "FROM rows_v1 WHERE run_id IS NOT NULL AND result_json IS NOT NULL",
            (proc,),
        )
        conn.execute(
            "INSERT OR IGNORE INTO runs(run_id, batch, cursor, created_at, state) SELECT run_id, "
            "COALESCE(batch, 0), COALESCE(run_cursor, ''), COALESCE(submitted_at, 0), 'waiting' FROM rows_v1 "
            "WHERE state='submitted' AND run_id IS NOT NULL"
        )
        conn.execute("UPDATE rows SET run_id=NULL WHERE state='submitted'")  # v1 paired them by position
        conn.execute("DROP TABLE rows_v1")
        conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('legacy_schema', '1')")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def add_run_columns(conn: Any) -> None:
    """Give a journal written before per-processor accounting `spend.processor`, `runs.processor` and
    `runs.finished_at` (nullable columns: an older enrich still writes this journal), filled from what it holds.

    A run's processor and finish time come from its stored result, or from the failed row that names it, or
    (still waiting) from its batch's rows. A spend entry's processor is the one processor used in this
    journal at that price; when two share a price (`lite` and `lite-fast`) it stays NULL (reported as such).
    """
    added = []
    for table, column, kind in (
        ("spend", "processor", "TEXT"),
        ("runs", "processor", "TEXT"),
        ("runs", "finished_at", "REAL"),
    ):
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            added.append((table, column, kind))
    if not added:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, kind in added:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        conn.execute(
            "UPDATE runs SET processor=COALESCE("
            "(SELECT processor FROM results s WHERE s.run_id=runs.run_id), "
            "(SELECT run_processor FROM rows r WHERE r.run_id=runs.run_id), "
            "(SELECT run_processor FROM rows r WHERE r.batch=runs.batch AND r.state='submitted' LIMIT 1)), "
            "finished_at=CASE WHEN state='recorded' THEN COALESCE("
            "(SELECT completed_at FROM results s WHERE s.run_id=runs.run_id), "
            "(SELECT finished_at FROM rows r WHERE r.run_id=runs.run_id AND r.state='failed')) END "
            "WHERE processor IS NULL"
        )
        used = [
            r[0]
            for r in conn.execute(
                "SELECT processor FROM results UNION SELECT run_processor FROM rows UNION SELECT processor FROM rows"
            )
        ]
        by_price: dict[int, list[str]] = {}
        for name in used:
            if name in PROCESSORS:
                by_price.setdefault(PROCESSORS[name].price_micros, []).append(name)
        for price, names in by_price.items():
            if len(names) == 1:
                conn.execute(
                    "UPDATE spend SET processor=? WHERE processor IS NULL AND ABS(micros)=?", (names[0], price)
                )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def add_reuse_columns(conn: Any) -> None:
    """Give a journal written before result reuse across rows and jobs its columns (nullable or defaulted, so an
    older enrich still writes it): `rows.waits`, `rows.reused`, `rows.cache_seq`, `results.row_ref`,
    `results.origin`."""
    added = []
    for table, column, kind in (
        ("rows", "waits", "INTEGER NOT NULL DEFAULT 0"),
        ("rows", "reused", "TEXT"),
        ("rows", "cache_seq", "INTEGER"),
        ("results", "row_ref", "TEXT"),
        ("results", "origin", "TEXT"),
    ):
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            added.append((table, column, kind))
    if not added:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, kind in added:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def chunks(items: list[Any], n: int = 900) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
