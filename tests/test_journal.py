"""journal.py: transitions with from-states, durable budget, incremental seeding, results reuse, lock."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from enrich.errors import BudgetExceeded, JournalError
from enrich.journal import DuplicateKey, Finished, Journal, TransitionError

PRICES = {"lite": 5000, "base": 10000}


def rows(keys: list[str], inp: str = "x", spec: str = "s", proc: str = "lite") -> list[list[tuple]]:
    return [
        [
            (json.dumps([k]), f"ref{k}", i, i + 2, json.dumps([k]), json.dumps({"c": k + inp}), k + inp, spec, proc)
            for i, k in enumerate(keys)
        ]
    ]


def done(ref: str, attempt: int, run_id: str, result: str = '{"output": {}}') -> Finished:
    return Finished(run_id, ref, attempt, result_json=result)


@pytest.fixture
def j(tmp_path: Path):
    journal = Journal.open(tmp_path / "j.sqlite")
    yield journal
    journal.close()


def test_file_modes_and_pragmas(j: Journal, tmp_path: Path) -> None:
    """Journal is 0600, WAL, synchronous=FULL, and passes integrity_check."""
    assert oct((tmp_path / "j.sqlite").stat().st_mode & 0o777) == "0o600"
    assert j.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert j.integrity_ok()


def test_second_writer_is_refused(j: Journal, tmp_path: Path) -> None:
    """A second writer is refused; a read-only view (enrich status) still works."""
    with pytest.raises(JournalError, match="in use"):
        Journal.open(tmp_path / "j.sqlite")
    ro = Journal.open(tmp_path / "j.sqlite", readonly=True)
    assert ro.counts(1) == {}
    ro.close()


def test_symlink_shares_the_lock(j: Journal, tmp_path: Path) -> None:
    """The lock is on the file itself: a symlink to a journal in use is refused too."""
    (tmp_path / "alias.sqlite").symlink_to(tmp_path / "j.sqlite")
    with pytest.raises(JournalError, match="in use"):
        Journal.open(tmp_path / "alias.sqlite")


def test_symlink_lock_holds_across_processes(tmp_path: Path) -> None:
    """Another process opening the journal through a symlink is refused while this one holds it."""
    j = Journal.open(tmp_path / "j.sqlite")
    (tmp_path / "alias.sqlite").symlink_to(tmp_path / "j.sqlite")
    code = (
        "import sys\nfrom enrich.journal import Journal\nfrom enrich.errors import JournalError\n"
        f"try:\n    Journal.open({str(tmp_path / 'alias.sqlite')!r})\nexcept JournalError:\n    sys.exit(7)\n"
    )
    try:
        assert subprocess.run([sys.executable, "-c", code]).returncode == 7
    finally:
        j.close()


def test_hard_link_is_refused(tmp_path: Path) -> None:
    """A hard-linked journal is refused (SQLite's WAL is per path, the lock per inode)."""
    Journal.open(tmp_path / "j.sqlite").close()
    os.link(tmp_path / "j.sqlite", tmp_path / "link.sqlite")
    with pytest.raises(JournalError, match="hard links"):
        Journal.open(tmp_path / "link.sqlite")


def test_status_on_a_non_journal_is_a_journal_error(tmp_path: Path) -> None:
    """Opening a random or empty file read-only raises JournalError, not sqlite3 errors."""
    (tmp_path / "x.txt").write_text("hello, not a database\n" * 100)
    (tmp_path / "empty").write_bytes(b"")
    for name in ("x.txt", "empty"):
        with pytest.raises(JournalError, match="not an enrich journal"):
            Journal.open(tmp_path / name, readonly=True)


def test_claim_reserves_budget_durably_and_stops_at_the_cap(j: Journal) -> None:
    """Claim reserves budget in the intent transaction and refuses beyond the budget."""
    j.seed(rows(["a", "b", "c"]), 1, None, False)
    got = j.claim(1, 10, PRICES, budget=12000, now=1.0, batch=1)
    assert [c.row_key for c in got] == ['["a"]', '["b"]'] and j.spent_micros() == 10000
    with pytest.raises(BudgetExceeded):
        j.claim(1, 10, PRICES, budget=12000, now=1.0, batch=2)
    assert j.counts(1) == {"intent": 2, "pending": 1}


def test_release_refunds_and_unknown_keeps_reservation(j: Journal) -> None:
    """Release refunds; unknown keeps the reservation; next_at delays the retry."""
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 10, PRICES, None, 1.0, 1)
    j.release([('["a"]', 1)], 2.0, 5.0, "429", max_retries=6)
    j.mark_unknown([('["b"]', 1)], "lost")
    assert j.spent_micros() == 5000
    assert j.counts(1) == {"pending": 1, "unknown": 1}
    assert [u.row_key for u in j.unresolved()] == ['["b"]']
    assert not j.has_pending(1, now=4.0) and j.has_pending(1, now=6.0)


def test_transitions_raise_when_the_row_is_elsewhere(j: Journal) -> None:
    """A transition from the wrong state or for another attempt raises, and changes nothing."""
    j.seed(rows(["a"]), 1, None, False)
    with pytest.raises(TransitionError):
        j.mark_unknown([('["a"]', 1)], "x")  # still pending
    j.claim(1, 1, PRICES, None, 0.0, 1)
    with pytest.raises(TransitionError):
        j.release([('["a"]', 2)], 0.0, None, "x", 6)  # a decision about another attempt
    with pytest.raises(TransitionError):
        j.adopt([('["a"]', 7, "trun_x", "")], 0.0)
    assert j.counts(1) == {"intent": 1} and j.spent_micros() == 5000


def test_safe_failures_do_not_count_only_row_rejections_do(j: Journal) -> None:
    """Transient releases never fail a row; rejections of the row itself do, at max_retries."""
    j.seed(rows(["a"]), 1, None, False)
    for n in range(1, 10):
        c = j.claim(1, 1, PRICES, None, 0.0, n)[0]
        assert c.attempt == n  # metadata enrich_try never repeats for a row
        j.release([(c.row_key, c.attempt)], 0.0, None, "429", max_retries=3)
    assert j.counts(1) == {"pending": 1}
    for n in range(10, 13):
        c = j.claim(1, 1, PRICES, None, 0.0, n)[0]
        j.release([(c.row_key, c.attempt)], 0.0, None, "422", max_retries=3, count_retry=True)
    assert j.counts(1) == {"failed": 1}


def test_results_are_matched_by_metadata_not_position(j: Journal) -> None:
    """Run ids in any order: each result lands on the row its metadata names."""
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 10, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1), ('["b"]', 1)], ["trun_2", "trun_1"], 1, "", 1.0)
    assert sorted(r[0] for r in j.waiting_runs()) == ["trun_1", "trun_2"]
    n, refused = j.record(
        [done("refa", 1, "trun_1", '{"v": "A"}'), done("refb", 1, "trun_2", '{"v": "B"}'), done("nobody", 1, "trun_9")],
        2.0,
    )
    assert n == 2 and refused == ["trun_9"]
    got = {json.loads(r[0])[0]: (r[3], r[8][0][2]) for chunk in j.iter_results(1, ["lite"]) for r in chunk}
    assert got == {"a": ("trun_1", '{"v": "A"}'), "b": ("trun_2", '{"v": "B"}')}
    assert j.waiting_runs() == []


def test_record_twice_is_harmless_and_failed_runs_fail(j: Journal) -> None:
    """A repeated result changes nothing; a failed run fails its row."""
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 10, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1), ('["b"]', 1)], ["t1", "t2"], 1, "", 1.0)
    j.record([done("refa", 1, "t1"), Finished("t2", "refb", 1, error="run failed: x")], 2.0)
    assert j.record([done("refa", 1, "t1")], 3.0) == (0, [])
    assert j.counts(1) == {"done": 1, "failed": 1}


def test_incremental_reseed_and_result_reuse_across_processors(j: Journal) -> None:
    """Same input: nothing to do; lite -> base -> lite reuses the paid lite result."""
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 10, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1), ('["b"]', 1)], ["t1", "t2"], 1, "", 1.0)
    j.record([done("refa", 1, "t1"), Finished("t2", "refb", 1, error="run failed")], 2.0)
    j.seed(rows(["a", "b"]), 2, None, False)
    assert j.counts(2) == {"done": 1, "failed": 1}
    j.seed(rows(["a", "b"], proc="base"), 3, None, False)  # another processor: research again
    assert j.counts(3) == {"pending": 2}
    j.seed(rows(["a", "b"], proc="lite"), 4, None, False)  # back to lite: a's result is reused
    assert j.counts(4) == {"done": 1, "pending": 1}  # (a failure is not a result to reuse)
    j.conn.execute(
        "UPDATE rows SET state='failed', run_processor='lite', run_input_hash=input_hash, "
        "run_spec_hash=spec_hash WHERE row_key='[\"b\"]'"
    )
    j.seed(rows(["a", "b"]), 5, None, False)
    assert j.counts(5) == {"done": 1, "failed": 1}
    j.seed(rows(["a", "b"]), 6, None, True)  # --retry-failed
    assert j.counts(6) == {"done": 1, "pending": 1}
    j.seed(rows(["a", "b"], inp="changed"), 7, None, False)
    assert j.counts(7) == {"pending": 2}
    j.seed(rows(["a"]), 8, refresh_before=3.0, retry_failed=False)  # stale: refresh due
    assert j.counts(8) == {"pending": 1}


def test_result_for_a_changed_row_goes_back_to_pending(j: Journal) -> None:
    """Input changed while the run was in flight: result kept, row researched again."""
    j.seed(rows(["a"]), 1, None, False)
    j.claim(1, 1, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1)], ["t1"], 1, "", 1.0)
    j.seed(rows(["a"], inp="new"), 2, None, False)
    assert j.counts(2) == {"submitted": 1}
    j.record([done("refa", 1, "t1")], 2.0)
    assert j.counts(2) == {"pending": 1}
    assert j.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1  # paid for: kept


def test_timed_out_run_is_collected_by_retry_failed(j: Journal) -> None:
    """A timed-out row goes back to waiting on its own run with --retry-failed (no new claim)."""
    j.seed(rows(["a"]), 1, None, False)
    j.claim(1, 1, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1)], ["t1"], 1, "", 1.0)
    assert j.time_out("t1", "refa", 1, 99.0)
    assert j.counts(1) == {"timed_out": 1} and j.waiting_runs() == []
    j.seed(rows(["a"]), 2, None, True)
    assert j.counts(2) == {"submitted": 1} and [r[0] for r in j.waiting_runs()] == ["t1"]
    j.record([done("refa", 1, "t1")], 100.0)
    assert j.counts(2) == {"done": 1} and j.spent_micros() == 5000


def test_a_run_recorded_unnamed_is_waited_for_again_once_adopted(j: Journal) -> None:
    """A result that named no row is refused; when reconciliation then adopts that run for its row, the run
    is waited for again and the next result (named by run id) finishes the row: never "recorded" and
    "submitted" at once."""
    j.seed(rows(["a"]), 1, None, False)
    j.claim(1, 1, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1)], ["t1"], 1, "", 1.0)
    assert j.record([Finished("t1", None, None, result_json='{"output": {}}')], 2.0) == (0, ["t1"])
    assert j.waiting_runs() == [] and j.orphaned_submitted() == [('["a"]', 1)]
    j.unknown_from_submitted([('["a"]', 1)], "no run attributed")
    j.adopt([('["a"]', 1, "t1", "")], 3.0)
    assert [r[0] for r in j.waiting_runs()] == ["t1"]
    assert j.attribute("t1", None, None) == ("refa", 1)
    j.record([done("refa", 1, "t1")], 4.0)
    assert j.counts(1) == {"done": 1} and j.waiting_runs() == []


def test_action_required_rows_are_asked_again_by_the_next_run(j: Journal) -> None:
    """A held row keeps its run and its reservation through a re-seed; recheck_held waits for the run again."""
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 2, PRICES, None, 0.0, 1)
    j.mark_submitted([('["a"]', 1), ('["b"]', 1)], ["t1", "t2"], 1, "", 1.0)
    assert j.hold("t1", "refa", 1, "run action_required: act first", 2.0)
    assert j.counts(1) == {"action_required": 1, "submitted": 1}
    assert [r[0] for r in j.waiting_runs()] == ["t2"]
    j.seed(rows(["a", "b"]), 2, None, False)  # the next run: nothing is sent for the held row
    assert j.counts(2) == {"action_required": 1, "submitted": 1} and not j.has_pending(2)
    assert j.recheck_held() == 1
    assert sorted(r[0] for r in j.waiting_runs()) == ["t1", "t2"] and j.counts(2) == {"submitted": 2}
    j.record([done("refa", 1, "t1")], 3.0)
    assert j.counts(2) == {"done": 1, "submitted": 1} and j.spent_micros() == 10000


def test_duplicate_keys_are_detected_with_lines(j: Journal) -> None:
    """Duplicate keys within and across batches raise DuplicateKey with both lines."""
    batch = rows(["a", "b"])[0] + [(json.dumps(["a"]), "refa2", 2, 9, "[]", "{}", "h", "s", "lite")]
    with pytest.raises(DuplicateKey) as info:
        j.seed([batch], 1, None, False)
    assert (info.value.first_line, info.value.line) == (2, 9)
    assert j.counts(1) == {}
    with pytest.raises(DuplicateKey):
        j.seed([rows(["a"])[0], rows(["a"])[0]], 1, None, False)


def test_identity_is_checked(j: Journal) -> None:
    """A journal refuses another job's identity unless adopted; the API key binds once a group exists."""
    ident = {"output": "/o.csv", "task_spec": "s1", "key_columns": ["k"], "api_key": "h1"}
    j.check_identity(ident, adopt=False)
    j.check_identity({**ident, "api_key": "h2"}, adopt=False)  # nothing created yet
    j.set("taskgroup_id", "tgrp_1")
    with pytest.raises(JournalError, match="api_key"):
        j.check_identity({**ident, "api_key": "h3"}, adopt=False)
    with pytest.raises(JournalError, match="output"):
        j.check_identity({**ident, "api_key": "h2", "output": "/p.csv"}, adopt=False)
    j.check_identity({**ident, "output": "/p.csv"}, adopt=True)
    assert j.get("identity")["output"] == "/p.csv"


class JournalMachine(RuleBasedStateMachine):
    """Random sequences of transitions against a model: states, money and runs always agree."""

    KEYS = ("a", "b", "c", "d")

    def __init__(self) -> None:
        super().__init__()
        self.j = Journal.open(":memory:")
        self.j.seed(rows(self.KEYS), 1, None, False)
        self.model = {k: "pending" for k in self.KEYS}
        self.attempt = dict.fromkeys(self.KEYS, 0)
        self.reserved = 0
        self.runs: dict[str, str] = {}  # run_id -> key
        self.seq = 0

    def keys_in(self, *states: str) -> list[str]:
        return [k for k in self.KEYS if self.model[k] in states]

    @rule(n=st.integers(1, 4))
    def claim(self, n: int) -> None:
        self.seq += 1
        got = self.j.claim(1, n, PRICES, None, 0.0, self.seq)
        expect = self.keys_in("pending")[:n]
        assert [json.loads(c.row_key)[0] for c in got] == expect
        for k in expect:
            self.model[k] = "intent"
            self.attempt[k] += 1
            self.reserved += PRICES["lite"]

    @precondition(lambda self: self.keys_in("intent"))
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(self.keys_in("intent")), min_size=1, unique=True))
        ids = [f"t{self.seq}_{k}_{self.attempt[k]}" for k in keys]
        self.j.mark_submitted([(json.dumps([k]), self.attempt[k]) for k in keys], ids[::-1], self.seq, "", 1.0)
        for k, rid in zip(keys, ids, strict=True):
            self.model[k] = "submitted"
            self.runs[rid] = k

    @precondition(lambda self: self.keys_in("intent"))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(self.keys_in("intent")))
        self.j.mark_unknown([(json.dumps([k]), self.attempt[k])], "lost")
        self.model[k] = "unknown"

    @precondition(lambda self: self.keys_in("intent", "unknown"))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(self.keys_in("intent", "unknown")))
        self.j.release([(json.dumps([k]), self.attempt[k])], 0.0, None, "gone", 6)
        self.model[k] = "pending"
        self.reserved -= PRICES["lite"]

    @rule(data=st.data())
    def wrong_transition(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(self.KEYS))
        if self.model[k] != "intent":
            with pytest.raises(TransitionError):
                self.j.mark_unknown([(json.dumps([k]), self.attempt[k])], "x")

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data: st.DataObject, ok: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.runs)))
        k = self.runs.pop(rid)
        attempt = int(rid.rsplit("_", 1)[1])
        f = Finished(rid, f"ref{k}", attempt, result_json='{"o": 1}' if ok else None, error=None if ok else "x")
        self.j.record([f], 2.0)
        if self.model[k] == "submitted" and attempt == self.attempt[k]:
            self.model[k] = "done" if ok else "failed"

    @invariant()
    def agrees(self) -> None:
        counts: dict[str, int] = {}
        for s in self.model.values():
            counts[s] = counts.get(s, 0) + 1
        assert self.j.counts(1) == counts
        assert self.j.spent_micros() == self.reserved
        assert sorted(r[0] for r in self.j.waiting_runs()) == sorted(self.runs)

    def teardown(self) -> None:
        self.j.close()


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def _paid_history(j: Journal) -> None:
    """lite: a released (never created), b completed, c failed; base: d in flight."""
    j.seed(rows(["a", "b", "c"]), 1, None, False)
    j.claim(1, 10, PRICES, None, 0.0, 1)
    j.release([('["a"]', 1)], 0.5, None, "429", max_retries=6)
    j.mark_submitted([('["b"]', 1), ('["c"]', 1)], ["t1", "t2"], 1, "", 1.0)
    j.record([done("refb", 1, "t1"), Finished("t2", "refc", 1, error="run failed: x")], 3.0)
    j.seed(rows(["d"], proc="base"), 2, None, False)
    j.claim(2, 10, PRICES, None, 4.0, 2)
    j.mark_submitted([('["d"]', 1)], ["t3"], 2, "", 5.0)


def test_paid_by_processor_counts_every_reserved_run_and_its_release(j: Journal) -> None:
    """Runs and spend per processor: completed, failed and in-flight runs count, a released one does not."""
    _paid_history(j)
    assert j.paid_by_processor() == {"lite": (2, 10000), "base": (1, 10000)}
    assert sum(m for _, m in j.paid_by_processor().values()) == j.spent_micros()
    assert sorted(j.run_latencies() or []) == [("lite", 2.0), ("lite", 2.0)]  # t3 has not finished


def test_journal_from_before_per_processor_accounting_is_filled_in_on_open(tmp_path: Path) -> None:
    """Spend and runs of an older journal get their processor (and finish time) from what it holds."""
    path = tmp_path / "old.sqlite"
    j = Journal.open(path)
    _paid_history(j)
    j.close()
    raw = sqlite3.connect(path)
    for table, column in (("spend", "processor"), ("runs", "processor"), ("runs", "finished_at")):
        raw.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    raw.commit()
    raw.close()
    view = Journal.open(path, readonly=True)
    assert view.paid_by_processor() == {None: (3, 20000)} and view.run_latencies() is None
    view.close()
    j = Journal.open(path)
    try:
        assert j.paid_by_processor() == {"lite": (2, 10000), "base": (1, 10000)}
        assert sorted(j.run_latencies() or []) == [("lite", 2.0), ("lite", 2.0)]
        assert dict(j.conn.execute("SELECT run_id, processor FROM runs")) == {"t1": "lite", "t2": "lite", "t3": "base"}
    finally:
        j.close()
