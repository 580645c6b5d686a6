"""Pay once for the same research: the one owner of result reuse.

Every path that could pay for a run asks one question first: *is there a completed result for
(input hash, task-spec fingerprint, processor)?* The input hash is the canonical JSON of the columns
sent (`[input] columns`), the fingerprint covers the task spec and run options (config.spec_fingerprint),
never the row key, the job or the output, so the answer carries across rows and across jobs. It is
answered in this order:

1. **This journal** (its `results` table): a row seeded `pending` whose key already has a result is done
   at once (journal_sql.REUSE_SQL; not older than `refresh_after_days`); with `[input] dedupe` (the
   default) rows of one key share one run: one is claimed, the others wait (`rows.waits`) and take its
   outcome in the transaction that records it (journal_sql.SHARE_SQL), exactly once across crashes
   because only claimed rows are ever sent, and only one row per key is claimable at a time.
2. **The shared cache** (`[cache] path`, `--cache PATH`; this module's `ResultCache`): a SQLite file any
   number of jobs use at once. It is read in the claim's own transaction for the rows about to be claimed
   (`Reuse.serve`, and once for every pending row before the first claim), and written right after a
   completed result is recorded in the journal (`Reuse.publish`, short transactions; a crash leaves no
   partial entry, and what was not published yet is published by the next run). Entries are marked by
   origin: results from the emulator are never served to a job that talks to the real API (nor the other
   way round).

What two jobs sharing a cache guarantee: a row is never claimed (and paid for) when the cache held a
result for its key, of its origin and fresh enough, at the moment of its claim: the look-up and the claim
are one journal transaction, and the claim records the cache's last entry number it saw (`rows.cache_seq`).
Two jobs pay twice for one key only when both claimed it before either's result was in the cache.

For a pilot (issue 16) or any other caller that must not pay twice for a (row, processor): `Reuse.find`
answers the question for a list of keys, journal first, then cache, and a run it then makes is an ordinary
journaled claim, so the full run afterwards finds its result in the journal (step 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from enrich import failpoints
from enrich.errors import CacheError, ConfigError
from enrich.journal import Cached, Journal
from enrich.processors import PROCESSORS
from enrich.storage import ModeSetting, detect

CACHE_FORMAT = "enrich-results-cache"
CACHE_VERSION = 1
PUBLISH_CHUNK = 500  # entries per write transaction: short, so several jobs share the file smoothly
Origin = Literal["api", "emulator"]
Key = tuple[str, str, str]  # (input hash, spec fingerprint, processor)

CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
  seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- increasing: what a claim saw is `seq <= cache_seq`
  input_hash   TEXT NOT NULL,
  spec_hash    TEXT NOT NULL,
  processor    TEXT NOT NULL,
  origin       TEXT NOT NULL,        -- api | emulator: an emulated result is never served to a real-API job
  run_id       TEXT NOT NULL,        -- the run that paid for it
  completed_at REAL NOT NULL,        -- when that run's result was recorded (refresh_after_days counts from here)
  stored_at    REAL NOT NULL,
  price_micros INTEGER NOT NULL,     -- what the run cost
  result_json  TEXT NOT NULL,        -- raw {run, output} JSON as the API sent it
  UNIQUE (input_hash, spec_hash, processor, origin, run_id)
);
CREATE INDEX IF NOT EXISTS entries_key ON entries(input_hash, spec_hash, processor, origin, completed_at);
"""


class ResultCache:
    """A results cache file shared by jobs: open with `ResultCache.open(path)`.

    WAL mode with a busy timeout, so readers never wait for a writer and writers take turns; every
    write is one short transaction. On a network file system (storage.detect: NFS, SMB, FUSE...), where
    WAL's shared-memory index cannot work, the rollback journal instead, as for journals there; `mode` is the
    job's `limits.journal_mode`, so a network mode forced for storage detection misses holds for the cache too. A file that is not an enrich results cache (or is corrupt, or from
    a newer enrich) is refused with CacheError (exit 2), never silently ignored or overwritten."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn, self.path = conn, path

    @classmethod
    def open(cls, path: str | Path, create: bool = True, mode: ModeSetting = "auto") -> ResultCache:
        path = Path(os.path.realpath(_expand(path)))
        if path.is_dir():
            raise CacheError(f"{path}: is a directory, not a results cache file")
        exists = path.is_file() and path.stat().st_size > 0
        if not exists and not create:
            raise CacheError(
                f"{path}: no such results cache; a job makes it when it runs with --cache PATH or [cache] path"
            )
        try:
            if not exists:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # 0600: results may be about people
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        except OSError as exc:
            raise CacheError(f"{path}: cannot open the results cache ({exc.strerror or exc})") from None
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if exists:
                _check_format(conn, path, tables)
            # auto keeps a cache a job put in the network mode there (detection can miss a share: the job forced it)
            kept = exists and bool(tables) and conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "delete"
            network = mode == "network" or (mode == "auto" and (kept or detect(path).network))
            conn.execute(f"PRAGMA journal_mode={'DELETE' if network else 'WAL'}")
            conn.execute("PRAGMA synchronous=FULL")
            if not exists or not tables:  # one transaction: another job opening it meanwhile sees all or nothing
                conn.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, CACHE_SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('format', ?)", (json.dumps(CACHE_FORMAT),))
                conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('version', ?)", (json.dumps(CACHE_VERSION),))
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise CacheError(f"{path}: the results cache stayed locked by another process ({exc})") from None
            raise CacheError(f"{path}: not a usable results cache ({exc}); use another --cache path") from None
        except CacheError:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    def lookup(self, keys: Iterable[Key], origin: Origin, fresh_after: float | None) -> tuple[dict[Key, Cached], int]:
        """The newest entry of `origin` (completed at or after `fresh_after`) for each key it holds, and the last
        entry number this read saw (one snapshot: what is not in the answer was not committed when it was read)."""
        found: dict[Key, Cached] = {}
        todo = list(keys)
        try:
            self.conn.execute("BEGIN")  # one read snapshot for the answer and the entry number
            try:
                for i in range(0, len(todo), 300):
                    part = todo[i : i + 300]
                    marks = ",".join("(?, ?, ?)" for _ in part)
                    args: list[Any] = [v for k in part for v in k]
                    for in_h, spec_h, proc, run_id, done_at, res, _ in self.conn.execute(
                        "SELECT e.input_hash, e.spec_hash, e.processor, e.run_id, e.completed_at, e.result_json, "
                        "MAX(e.completed_at) FROM entries e WHERE (e.input_hash, e.spec_hash, e.processor) IN "
                        f"(VALUES {marks}) AND e.origin=? AND e.completed_at>=? GROUP BY 1, 2, 3",
                        (*args, origin, fresh_after if fresh_after is not None else float("-inf")),
                    ):
                        found[(in_h, spec_h, proc)] = Cached(run_id, done_at, res)
                seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()[0]
            finally:
                self.conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: cannot read the results cache ({exc})") from None
        return found, int(seq)

    def put(self, entries: list[tuple[str, str, str, str, float, str]], origin: Origin, now: float) -> int:
        """Store completed results: (input hash, spec hash, processor, run id, completed at, result JSON). One
        transaction: all or none of them. Returns how many were new."""
        if not entries:
            return 0
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO entries(input_hash, spec_hash, processor, origin, run_id, completed_at, "
                "stored_at, price_micros, result_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (in_h, spec_h, proc, origin, run_id, done_at, now, _price(proc), res)
                    for in_h, spec_h, proc, run_id, done_at, res in entries
                ],
            )
            failpoints.hit("mid_cache_write")
            new = self.conn.total_changes - before
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        return new

    def stats(self) -> dict[str, Any]:
        """Entries per origin and processor, their value (what the runs cost), oldest/newest, the file size."""
        rows = self.conn.execute(
            "SELECT origin, processor, COUNT(*), SUM(price_micros), MIN(completed_at), MAX(completed_at) "
            "FROM entries GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        keys = self.conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM entries GROUP BY input_hash, spec_hash, processor, origin)"
        ).fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "path": str(self.path),
            "entries": sum(r[2] for r in rows),
            "keys": keys,
            "value_usd": round(sum(r[3] or 0 for r in rows) / 1e6, 6),
            "oldest": min((r[4] for r in rows), default=None),
            "newest": max((r[5] for r in rows), default=None),
            "bytes": size,
            "by_origin": {
                o: {
                    p: {"entries": n, "value_usd": round((m or 0) / 1e6, 6)}
                    for o2, p, n, m, _lo, _hi in rows
                    if o2 == o
                }
                for o in sorted({r[0] for r in rows})
            },
        }

    def prune(self, older_than_s: float, now: float) -> int:
        """Remove entries completed more than `older_than_s` seconds ago; returns how many."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            n = self.conn.execute("DELETE FROM entries WHERE completed_at < ?", (now - older_than_s,)).rowcount
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.execute("VACUUM")
        return int(n)


def _check_format(conn: sqlite3.Connection, path: Path, tables: set[str]) -> None:
    """Refuse a file that is not an enrich results cache of a version this enrich reads."""
    if not tables:
        return  # an empty SQLite file: made a cache
    if "meta" not in tables or "entries" not in tables:
        raise CacheError(
            f"{path}: not an enrich results cache (it holds tables {', '.join(sorted(tables))}); "
            "use another --cache path"
        )
    meta = dict(conn.execute("SELECT k, v FROM meta"))
    if json.loads(meta.get("format", "null")) != CACHE_FORMAT:
        raise CacheError(f"{path}: not an enrich results cache (no format marker); use another --cache path")
    version = json.loads(meta.get("version", "0"))
    if not isinstance(version, int) or version > CACHE_VERSION:
        raise CacheError(f"{path}: results cache written by a newer enrich (version {version})")


def _price(processor: str) -> int:
    p = PROCESSORS.get(processor)
    return p.price_micros if p else 0


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """An age in seconds: `parse_age('90d')` -> 7776000.0 (units s, m, h, d, w). ConfigError otherwise."""
    m = _AGE.match(text)
    if not m:
        raise ConfigError(f"--older-than {text!r}: give a number and a unit, e.g. 90d, 12h, 2w (s, m, h, d, w)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass
class Found:
    """Where a key's completed result is: this journal's run id, or the cache's entry."""

    key: Key
    run_id: str
    source: Literal["journal", "cache"]
    cached: Cached | None = None


class Reuse:
    """One job's result reuse: its journal, its shared cache (or none), what counts as fresh, whether the cache
    may be read (`--fresh` writes but does not read it) and whose results it is (`origin`)."""

    def __init__(
        self,
        journal: Journal,
        cache: ResultCache | None,
        *,
        fresh_after: float | None,
        read: bool,
        emulated: bool,
        assume: Origin | None = None,
    ):
        self.journal, self.cache = journal, cache
        self.fresh_after, self.read, self.emulated = fresh_after, read, emulated
        self.assume = assume  # `plan`: the origin of a job whose server has not answered yet
        self.warned = False

    def origin(self) -> Origin | None:
        """Whose results this job makes: the emulator's, the real API's, or None before the server answered
        (then nothing is read from the cache or written to it)."""
        if self.emulated or self.journal.get("emulated") or self.journal.get("emulator_seen"):
            return "emulator"
        seen = self.journal.get("server_origin")
        return "emulator" if seen == "emulator" else "api" if seen == "api" else self.assume

    def serve(self, keys: list[Key]) -> tuple[dict[Key, Cached], int]:
        """The claim's look-up (journal.Serve): what the cache holds for `keys`, for this job's origin."""
        origin = self.origin()
        if self.cache is None or not self.read or origin is None:
            return {}, 0
        return self.cache.lookup(keys, origin, self.fresh_after)

    @property
    def serving(self) -> bool:
        return self.cache is not None and self.read

    def find(self, keys: list[Key]) -> dict[Key, Found]:
        """Is there a completed result for each key? This journal first (its newest fresh result), then the shared
        cache. The pilot asks this before it researches a (row, processor)."""
        out: dict[Key, Found] = {}
        for key, run_id in self.journal.results_for_keys(keys, self.fresh_after).items():
            out[key] = Found(key, run_id, "journal")
        rest = [k for k in keys if k not in out]
        if rest:
            hits, _ = self.serve(rest)
            for key, cached in hits.items():
                out[key] = Found(key, cached.run_id, "cache", cached)
        return out

    def serve_pending(self, epoch: int) -> int:
        """Before the first claim: every pending row the cache holds a result for is done with it."""
        if not self.serving or self.origin() is None:
            return 0
        return self.journal.serve_pending(epoch, self.serve, time.time())

    def publish(self) -> int:
        """Write this journal's completed results not yet in the cache (those it paid for itself). Never fails the
        job: a cache that cannot be written now is tried again after the next result (a warning is logged once)."""
        origin = self.origin()
        if self.cache is None or origin is None:
            return 0
        mark = self.journal.get("cache_published") or {}
        last = int(mark.get("rowid", 0)) if mark.get("path") == str(self.cache.path) else 0
        written = 0
        try:
            while batch := self.journal.own_results_after(last, PUBLISH_CHUNK):
                written += self.cache.put([b[1:] for b in batch], origin, time.time())
                last = batch[-1][0]
                self.journal.set("cache_published", {"path": str(self.cache.path), "rowid": last})
        except (sqlite3.Error, CacheError) as exc:
            if not self.warned:
                self.warned = True
                self.journal.log(
                    "warning", f"results cache {self.cache.path}: cannot write ({exc}); trying again later"
                )
        return written


def _expand(path: str | Path) -> Path:
    """`path` with `~` or `~user` expanded; CacheError (exit 2) when there is no such home directory."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib's answer to `~nosuchuser/...` or a `~` with no HOME
        raise CacheError(f"{path}: cannot expand '~' (no such user or home directory)") from None


def open_cache(path: Path | None, create: bool = True, mode: ModeSetting = "auto") -> ResultCache | None:
    """The job's results cache (None without one); without `create` (plan), a cache not made yet is None too.
    `mode`: the job's `limits.journal_mode` (auto: the cache's own file system decides)."""
    if path is None or (not create and not _expand(path).is_file()):
        return None
    return ResultCache.open(path, create=create, mode=mode)


def summary(journal: Journal, epoch: int, ladder: list[str]) -> dict[str, Any]:
    """What reuse saved this job, for the report: rows that took a twin's run (each would have paid for every rung
    of `ladder` up to its processor), rows served from the cache and the results it gave (each one run not paid
    for), rows skipped by `[input] where`, and what that is worth."""
    counts = journal.reuse_counts(epoch)
    if not counts:
        return {}
    twin = counts["twin"]
    cache_results = counts["cache_results"]

    def climbed_to(p: str) -> int:
        return sum(_price(q) for q in ladder[: ladder.index(p) + 1]) if p in ladder else _price(p)

    out = {
        "distinct_inputs": counts["distinct_inputs"],
        "rows_sharing_a_run": sum(twin.values()),
        "dedupe_saved_usd": round(sum(climbed_to(p) * n for p, n in twin.items()) / 1e6, 6),
        "rows_from_cache": counts["cache_rows"],
        "cache_results_used": sum(cache_results.values()),
        "cache_saved_usd": round(sum(_price(p) * n for p, n in cache_results.items()) / 1e6, 6),
        "rows_skipped": counts["skipped"],
    }
    return out


def cache_stats(path: str | Path) -> dict[str, Any]:
    """`enrich cache stats PATH`: what the cache holds (CacheError when it is not a results cache)."""
    cache = ResultCache.open(path, create=False)
    try:
        return cache.stats()
    finally:
        cache.close()


def format_cache_stats(info: dict[str, Any]) -> str:
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "-"

    lines = [
        f"cache        {info['path']}",
        f"entries      {info['entries']:,} ({info['keys']:,} distinct inputs x processor), worth "
        f"${info['value_usd']:,.4f} of runs",
        f"completed    {when(info['oldest'])} .. {when(info['newest'])}",
        f"size         {info['bytes'] / 1e6:,.1f} MB",
    ]
    for origin, procs in info["by_origin"].items():
        each = ", ".join(f"{p} {d['entries']:,} (${d['value_usd']:,.4f})" for p, d in procs.items())
        lines.append(f"  {origin:<10} {each}")
    return "\n".join(lines)


def prune_cache(path: str | Path, older_than: str) -> tuple[int, Path]:
    """`enrich cache prune PATH --older-than AGE`: remove entries completed longer ago than AGE."""
    age = parse_age(older_than)
    cache = ResultCache.open(path, create=False)
    try:
        return cache.prune(age, time.time()), cache.path
    finally:
        cache.close()
