"""journal.py: state transitions, durable budget, incremental seeding, single writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enrich.errors import BudgetExceeded, JournalError
from enrich.journal import DuplicateKey, Journal


def rows(keys: list[str], inp: str = "x", spec: str = "s") -> list[list[tuple]]:
    return [[(json.dumps([k]), f"ref{k}", i, i + 2, json.dumps([k]), json.dumps({"c": k + inp}), k + inp, spec)
             for i, k in enumerate(keys)]]


@pytest.fixture
def j(tmp_path: Path):
    journal = Journal.open(tmp_path / "j.sqlite")
    yield journal
    journal.close()


def test_file_modes_and_pragmas(j: Journal, tmp_path: Path) -> None:
    assert oct((tmp_path / "j.sqlite").stat().st_mode & 0o777) == "0o600"
    assert j.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.conn.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
    assert j.integrity_ok()


def test_second_writer_is_refused(j: Journal, tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="in use"):
        Journal.open(tmp_path / "j.sqlite")
    ro = Journal.open(tmp_path / "j.sqlite", readonly=True)   # `enrich status` still works
    assert ro.counts(1) == {}
    ro.close()


def test_claim_reserves_budget_durably_and_stops_at_the_cap(j: Journal) -> None:
    j.seed(rows(["a", "b", "c"]), 1, None, False)
    got = j.claim(1, 10, price=5000, budget=12000, now=1.0, batch=1)
    assert [c.row_key for c in got] == ['["a"]', '["b"]'] and j.spent_micros() == 10000
    with pytest.raises(BudgetExceeded):
        j.claim(1, 10, price=5000, budget=12000, now=1.0, batch=2)
    assert j.counts(1) == {"intent": 2, "pending": 1}


def test_release_refunds_and_unknown_keeps_reservation(j: Journal) -> None:
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 10, 5000, None, 1.0, 1)
    j.release(['["a"]'], 2.0, 5.0, "429", max_retries=6)
    j.mark_unknown(['["b"]'], "lost")
    assert j.spent_micros() == 5000
    assert j.counts(1) == {"pending": 1, "unknown": 1}
    assert [u.row_key for u in j.unresolved()] == ['["b"]']
    assert not j.has_pending(1, now=4.0) and j.has_pending(1, now=6.0)


def test_attempts_grow_and_retries_cap(j: Journal) -> None:
    j.seed(rows(["a"]), 1, None, False)
    for n in range(1, 4):
        c = j.claim(1, 1, 1, None, 0.0, n)[0]
        assert c.attempt == n    # metadata enrich_try never repeats for a row
        j.release([c.row_key], 0.0, None, "boom", max_retries=3)
    assert j.counts(1) == {"failed": 1}


def test_record_and_incremental_reseed(j: Journal) -> None:
    j.seed(rows(["a", "b"]), 1, None, False)
    j.claim(1, 10, 1, None, 0.0, 1)
    j.mark_submitted([('["a"]', "trun_a"), ('["b"]', "trun_b")], "", 1.0)
    assert j.record([("trun_a", '{"output": 1}')], [("trun_b", "run failed: x")], 2.0) == 2
    assert j.counts(1) == {"done": 1, "failed": 1}
    j.seed(rows(["a", "b"]), 2, None, False)             # same input: nothing to do
    assert j.counts(2) == {"done": 1, "failed": 1}
    j.seed(rows(["a", "b"]), 3, None, True)              # --retry-failed
    assert j.counts(3) == {"done": 1, "pending": 1}
    j.seed(rows(["a", "b"], inp="changed"), 4, None, False)
    assert j.counts(4) == {"pending": 2}
    j.seed(rows(["a"]), 5, refresh_before=None, retry_failed=False)
    assert j.counts(5) == {"pending": 1}                 # b is kept in the journal but not in this input


def test_result_for_a_changed_row_goes_back_to_pending(j: Journal) -> None:
    j.seed(rows(["a"]), 1, None, False)
    j.claim(1, 1, 1, None, 0.0, 1)
    j.mark_submitted([('["a"]', "trun_a")], "", 1.0)
    j.seed(rows(["a"], inp="new"), 2, None, False)       # input changed while the run was in flight
    assert j.counts(2) == {"submitted": 1}
    j.record([("trun_a", "{}")], [], 2.0)
    assert j.counts(2) == {"pending": 1}


def test_duplicate_keys_are_detected_with_lines(j: Journal) -> None:
    batch = rows(["a", "b"])[0] + [(json.dumps(["a"]), "refa", 2, 9, "[]", "{}", "h", "s")]
    with pytest.raises(DuplicateKey) as info:
        j.seed([batch], 1, None, False)
    assert (info.value.first_line, info.value.line) == (2, 9)
    assert j.counts(1) == {}
    with pytest.raises(DuplicateKey):
        j.seed([rows(["a"])[0], rows(["a"])[0]], 1, None, False)   # across batches


def test_timeouts(j: Journal) -> None:
    j.seed(rows(["a"]), 1, None, False)
    j.claim(1, 1, 1, None, 0.0, 1)
    j.mark_submitted([('["a"]', "trun_a")], "", 10.0)
    assert j.time_out(older_than=5.0, now=20.0) == []
    assert j.time_out(older_than=11.0, now=20.0) == ["trun_a"]
    assert j.counts(1) == {"timed_out": 1}
