"""Journal reads and transitions for decisions (gate, escalation, review) and the daily spend ledger.

A mixin of `journal.Journal`: it uses the journal's one connection (`self.conn`), its short
transactions (`self.tx()`) and its checked moves (`self._move`); journal.py stays the only module
that imports sqlite3.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from enrich.errors import TransitionError
from enrich.journal_sql import WAITS_SQL, chunks
from enrich.processors import strength


class DecisionStore:
    """Results across the processor ladder, escalation rungs, reviewer verdicts, spend per UTC day."""

    conn: Any
    _ledger_db: str | None = None
    # provided by Journal (journal.py), the one class this mixin is part of
    tx: Any
    _move: Any
    _ledger_job = ""
    dedupe = False  # twins share one run (Journal sets it from `[input] dedupe`)
    twins = True  # may a row wait for a twin (Journal)

    def spent_on_day(self, day: str) -> int:
        """Micro-dollars reserved on UTC `day` in the spend ledger (every job sharing it)."""
        if self._ledger_db is None:
            return 0
        return self.conn.execute(
            f"SELECT COALESCE(SUM(micros), 0) FROM {self._ledger_db}.ledger WHERE day=?", (day,)
        ).fetchone()[0]

    def reserved_on_day(self, day: str) -> int:
        """Micro-dollars this journal reserved on UTC `day` (its own spend table; releases are not subtracted,
        so a day's total can only be overstated, never understated)."""
        return self.conn.execute(
            "SELECT COALESCE(SUM(micros), 0) FROM spend WHERE micros > 0 AND date(at, 'unixepoch') = ?", (day,)
        ).fetchone()[0]

    def _held(self, c: Any, day: str) -> int:
        return c.execute(
            f"SELECT COALESCE(SUM(micros), 0) FROM {self._ledger_db}.ledger WHERE day=? AND job=?",
            (day, self._ledger_job),
        ).fetchone()[0]

    def day_lease(self, day: str, mine: int, daily: int | None, cap: int | None) -> int:
        """A job whose partitions do not use the ledger themselves (a --ray job; scale/governor.py): in one
        transaction, what is left of `daily` on `day` after the other jobs' entries and `mine` (the job's own
        reservations that day), at most `cap`; the job's entries for the day become mine + that. Returns it."""
        with self.tx() as c:
            held = self._held(c, day)
            others = self.spent_on_day(day) - held
            caps = [x for x in (None if daily is None else daily - others - mine, cap) if x is not None]
            lease = max(0, min(caps)) if caps else 0
            if mine + lease != held:
                c.execute(
                    f"INSERT INTO {self._ledger_db}.ledger(day, job, row_key, micros) VALUES (?, ?, 'day-lease', ?)",
                    (day, self._ledger_job, mine + lease - held),
                )
        return lease

    def day_settle(self, day: str, mine: int) -> None:
        """The job's entries for `day` become `mine`, what it really reserved that day (its lease settled)."""
        with self.tx() as c:
            held = self._held(c, day)
            if mine != held:
                c.execute(
                    f"INSERT INTO {self._ledger_db}.ledger(day, job, row_key, micros) VALUES (?, ?, 'day-settle', ?)",
                    (day, self._ledger_job, mine - held),
                )

    def _ledger_refund(self, c: Any, key: str) -> None:
        if self._ledger_db is None:
            return
        res = c.execute(
            f"SELECT day, micros FROM {self._ledger_db}.ledger WHERE job=? AND row_key=? AND micros>0 "
            "ORDER BY id DESC LIMIT 1",
            (self._ledger_job, key),
        ).fetchone()
        if res:
            c.execute(
                f"INSERT INTO {self._ledger_db}.ledger(day, job, row_key, micros) VALUES (?, ?, ?, ?)",
                (res[0], self._ledger_job, key, -res[1]),
            )

    def decided_rows(self, epoch: int, ladder: list[str], chunk: int = 2_000) -> Iterator[list[tuple[Any, ...]]]:
        """(id, row_key, state, processor, rung, input_hash, [(processor, run_id, result_json)]) of done rows and of
        failed rows that have a result on the ladder, in input order: what the escalation pass decides on."""
        last = -1
        while True:
            rows = self.conn.execute(
                "SELECT id, ordinal, row_key, state, processor, rung, input_hash, spec_hash FROM "
                "rows WHERE epoch=? AND ordinal>? AND state IN ('done', 'failed') ORDER BY "
                "ordinal LIMIT ?",
                (epoch, last, chunk),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][1]
            found = self._results_for([(r[6], r[7]) for r in rows], ladder)
            out = [(r[0], r[2], r[3], r[4], r[5], r[6], found.get((r[6], r[7]), [])) for r in rows]
            yield [o for o in out if o[2] == "done" or o[6]]

    def waiting_steps(self, epoch: int, ladder: list[str], chunk: int = 2_000) -> Iterator[list[tuple[Any, ...]]]:
        """(id, row_key, processor, waits, input_hash, [(processor, run_id, result_json)]) of rows that climbed onto
        a rung above the first and have no run created on it yet (pending there, its rung weaker), with a result
        on the ladder, in input order: the escalation pass checks they still need the step before it is paid."""
        last = -1
        above = ladder[1:]
        if not above:
            return
        marks = ",".join("?" * len(above))
        while True:
            rows = self.conn.execute(
                "SELECT id, ordinal, row_key, processor, rung, waits, input_hash, spec_hash FROM rows WHERE epoch=? "
                f"AND ordinal>? AND state='pending' AND processor IN ({marks}) ORDER BY ordinal LIMIT ?",
                (epoch, last, *above, chunk),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][1]
            found = self._results_for([(r[6], r[7]) for r in rows], ladder)
            # a row whose rung is this step (or above) had a run created there: that run decides, not this pass
            out = [
                (r[0], r[2], r[3], r[5], r[6], found.get((r[6], r[7]), []))
                for r in rows
                if r[4] is None or strength(r[4]) < strength(r[3])
            ]
            yield [o for o in out if o[5]]

    def _results_for(self, pairs: list[tuple[str, str]], ladder: list[str]) -> dict[tuple[str, str], list[Any]]:
        """(input_hash, spec_hash) -> [(processor, run_id, result_json)] for ladder processors (latest per one)."""
        found: dict[tuple[str, str], dict[str, tuple[str, str, str]]] = {}
        procs = ",".join("?" * len(ladder))
        for part in chunks(sorted({p[0] for p in pairs}), 500):
            marks = ",".join("?" * len(part))
            for in_h, spec_h, proc, rid, res in self.conn.execute(
                f"SELECT input_hash, spec_hash, processor, run_id, result_json FROM results WHERE input_hash IN "
                f"({marks}) AND processor IN ({procs}) ORDER BY completed_at",
                (*part, *ladder),
            ):
                found.setdefault((in_h, spec_h), {})[proc] = (proc, rid, res)
        return {k: list(v.values()) for k, v in found.items()}

    def climb(self, moves: list[tuple[int, str]], now: float) -> None:
        """done|failed -> pending on a stronger processor (escalation): the next run is a normal claim. With
        dedupe, twins that climb to the same processor climb on one run: all but one wait for it."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='pending', processor=?, next_at=NULL, error=NULL, finished_at=?, waits=0 "
                "WHERE id=? AND state IN ('done', 'failed')",
                [(p, now, i) for i, p in moves],
                "climb",
            )
            if self.dedupe:  # the moved rows and their pending twins: who leads, who waits
                self.twins = True
                for part in chunks([i for i, _ in moves]):
                    names = {f"i{n}": i for n, i in enumerate(part)}
                    inside = ",".join(f":{k}" for k in names)
                    c.execute(
                        WAITS_SQL.format(
                            scope=f"rows.input_hash IN (SELECT input_hash FROM rows WHERE id IN ({inside}))"
                        ),
                        names,
                    )

    def settle_steps(self, items: list[tuple[int, str, str]], now: float) -> None:
        """pending -> done for climbed rows whose step is no longer needed before any run was created on it (a
        reviewer decided the field that made the row climb, or the gate or `on` changed): (id, run_id, processor)
        of the best earlier result the row keeps. Twins waiting for one of them are decided again (WAITS_SQL)."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='done', run_id=?, processor=?, next_at=NULL, error=NULL, finished_at=?, "
                "waits=0 WHERE id=? AND state='pending'",
                [(r, p, now, i) for i, r, p in items],
                "settle_steps",
            )
            if self.dedupe:
                self.twins = True
                for part in chunks([i for i, _, _ in items]):
                    names = {f"i{n}": i for n, i in enumerate(part)}
                    inside = ",".join(f":{k}" for k in names)
                    c.execute(
                        WAITS_SQL.format(
                            scope=f"rows.input_hash IN (SELECT input_hash FROM rows WHERE id IN ({inside}))"
                        ),
                        names,
                    )

    def fall_back(self, items: list[tuple[int, str]], now: float) -> None:
        """failed -> done for an escalation run that failed: the row keeps its best earlier result (run_id)."""
        with self.tx() as c:
            self._move(
                c,
                "UPDATE rows SET state='done', run_id=?, error=NULL, finished_at=? WHERE id=? AND state='failed'",
                [(r, now, i) for i, r in items],
                "fall_back",
            )

    def escalated_count(self, epoch: int, base: str) -> int:
        return self.conn.execute(
            "SELECT COUNT(*) FROM rows WHERE epoch=? AND (processor!=? OR rung IS NOT NULL AND rung!=?)",
            (epoch, base, base),
        ).fetchone()[0]

    def row_keys(self, epoch: int) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT row_key FROM rows WHERE epoch=?", (epoch,))]

    def add_verdicts(
        self, verdicts: Sequence[tuple[str, str, str, str | None, str, str, str | None, str | None]], now: float
    ) -> int:
        """Append reviewer verdicts: (row_key, field, verdict, corrected_json, reviewer, note, run_id,
        previous_json); each is stamped with the row's current input so a later input change makes it stale."""
        with self.tx() as c:
            for v in verdicts:
                hit = c.execute("SELECT input_hash FROM rows WHERE row_key=?", (v[0],)).fetchone()
                if hit is None:
                    raise TransitionError(f"verdict for unknown row {v[0]}")
                c.execute(
                    "INSERT INTO verdicts(at, row_key, field, verdict, corrected_json, reviewer, note, run_id, "
                    "previous_json, input_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, *v, hit[0]),
                )
        return len(verdicts)

    def verdict_history(self) -> Iterator[tuple[str, str, str, str | None]]:
        """Every verdict as (row_key, field, verdict, previous_json), oldest first (calibration reads these)."""
        yield from self.conn.execute("SELECT row_key, field, verdict, previous_json FROM verdicts ORDER BY id")

    def verdicts_for(self, row_keys: list[str]) -> dict[str, list[tuple[Any, ...]]]:
        """row_key -> [(field, verdict, corrected_json, reviewer, note, run_id, input_hash, at)] oldest first."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        if self.conn.execute("SELECT 1 FROM verdicts LIMIT 1").fetchone() is None:
            return out
        for part in chunks(row_keys):
            marks = ",".join("?" * len(part))
            for r in self.conn.execute(
                f"SELECT row_key, field, verdict, corrected_json, reviewer, note, run_id, "
                f"input_hash, at FROM verdicts WHERE row_key IN ({marks}) ORDER BY id",
                part,
            ):
                out.setdefault(r[0], []).append(r[1:])
        return out

    def iter_results(
        self, epoch: int, ladder: list[str], chunk: int = 2_000, keys: Sequence[str] | None = None
    ) -> Iterator[list[tuple[Any, ...]]]:
        """(row_key, row_json, state, run_id, error, submitted_at, finished_at, input_hash,
        [(processor, run_id, result_json)]) in input order; results are those of the row's current input
        and task spec, one per ladder processor (also while a stronger processor's run is pending).
        `keys`: only these rows (in input order within each 500 of them)."""
        if keys is None:
            yield from self._iter_results(epoch, ladder, chunk, None)
            return
        for part in chunks(sorted(set(keys)), 500):
            yield from self._iter_results(epoch, ladder, chunk, part)

    def _iter_results(
        self, epoch: int, ladder: list[str], chunk: int, keys: Sequence[str] | None
    ) -> Iterator[list[tuple[Any, ...]]]:
        last = -1
        only = f" AND row_key IN ({','.join('?' * len(keys))})" if keys is not None else ""
        while True:
            rows = self.conn.execute(
                "SELECT ordinal, row_key, row_json, state, run_id, error, submitted_at, finished_at, input_hash, "
                f"spec_hash FROM rows WHERE epoch=? AND ordinal>?{only} ORDER BY ordinal LIMIT ?",
                (epoch, last, *(keys or ()), chunk),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            # every row's results, not only done rows': a row climbing the ladder keeps showing its best answer
            found = self._results_for([(r[8], r[9]) for r in rows], ladder)
            own: dict[str, tuple[str, str]] = {}  # run id -> (processor, result) of each done row's own run
            extra = {r[4] for r in rows if r[3] == "done" and r[4]}
            if extra:
                marks = ",".join("?" * len(extra))
                for rid, proc, res in self.conn.execute(
                    f"SELECT run_id, processor, result_json FROM results WHERE run_id IN ({marks})", list(extra)
                ):
                    own[rid] = (proc, res)
            out = []
            for r in rows:
                lst = found.get((r[8], r[9]), [])
                if r[3] == "done" and r[4] in own:
                    proc, res = own[r[4]]
                    # the row's own run is its answer on that processor (a twin without dedupe, or one paid
                    # twice, may hold a newer result of the same input); a reused result of a processor no
                    # longer on the ladder (or a legacy one) still counts
                    if all(x[1] != r[4] for x in lst):
                        lst = [x for x in lst if x[0] != proc] + [(proc, r[4], res)]
                out.append((*r[1:9], lst))
            yield out
