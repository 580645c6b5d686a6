"""Stage 5, decide: gate each field, escalate rows up the processor ladder, apply human verdicts.

The decisions themselves are in gate.py. Two entry points:

- `decided(...)` (pure) turns one row's stored results (one per processor on the ladder) and its
  reviewer verdicts into a `gate.MergedRow`: per field, the best answer across tiers, then
  human verdicts on top (final; stale when the row's input changed since).
- `escalate_pass(...)` (reads the journal, records its moves there) moves every finished row that still has a field whose decision is in
  `[escalate] on` one step up the ladder (done -> pending on the next processor), within
  `max_rows`. The next run is an ordinary journaled claim, so a step is paid for exactly once
  per (row, processor) across crashes: a processor counts as tried when a result exists for it
  or a run was ever created on it (`rung`), and nothing tried is tried again. A step whose run
  failed falls back to the best earlier answer (the row stays completed).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from enrich.config import RunConfig, build_task_spec, output_fields
from enrich.gate import MergedRow, Verdict, answer_of, apply_verdicts, merge, needs_escalation, next_processor
from enrich.journal import Journal
from enrich.processors import strength
from enrich.review import fits


def verdicts_of(
    rows: Iterable[tuple[Any, ...]],
    key: tuple[str, ...],
    input_hash: str,
    schemas: dict[str, dict[str, Any]] | None = None,
) -> list[Verdict]:
    """Journal verdict rows (oldest first) -> the verdicts still valid for the row's current input.

    A correction whose value does not fit its field (`schemas`; e.g. an integer beyond 64 bits that an
    older enrich accepted) is skipped like a stale one: a stored verdict never makes a job unwritable."""
    out: dict[str, Verdict] = {}
    for field, verdict, corrected, reviewer, note, run_id, v_hash, _at in rows:
        if v_hash != input_hash:
            continue  # stale: kept in the history, the field goes back through the gate
        value = json.loads(corrected) if corrected is not None else None
        if verdict == "correct" and schemas and field in schemas and fits(value, schemas[field]) is not None:
            continue
        out[field] = Verdict(
            key=key, field=field, verdict=verdict, corrected_value=value, reviewer=reviewer, note=note, run_id=run_id
        )
    return list(out.values())


def decided(
    results: list[tuple[str, str, Any]],
    fields: list[str],
    cfg: RunConfig,
    key: tuple[str, ...],
    verdict_rows: list[tuple[Any, ...]] | None = None,
    input_hash: str = "",
) -> MergedRow:
    """Merge (processor, run_id, result JSON or parsed dict) across tiers, then apply valid human verdicts.

    A verdict judges the answer of the run it names while that run is still one of the row's results: a stronger
    processor's answer that came later (the row climbed for another field) does not undo a human decision."""
    parsed = [(proc, rid, json.loads(res) if isinstance(res, str) else res) for proc, rid, res in results]
    merged = merge([(proc, res) for proc, _rid, res in parsed], fields, cfg.gate, key=key)
    if verdict_rows:
        schemas = output_fields(build_task_spec(cfg))
        valid = [v for v in verdicts_of(verdict_rows, key, input_hash, schemas) if v.field in fields]
        runs = {rid: (proc, res) for proc, rid, res in parsed}
        kept = dict(merged.fields)
        for v in valid:
            if v.run_id and v.run_id != kept[v.field].run_id and (ran := runs.get(v.run_id)) is not None:
                kept[v.field] = answer_of(ran[1], v.field, ran[0], cfg.gate)
        merged = apply_verdicts(replace(merged, fields=kept), valid)
    return merged


def climb_rates(journal: Journal, cfg: RunConfig, epoch: int, fields: list[str]) -> list[float | None]:
    """Per rung of the ladder but the last, the share of the rows that reached it which climb past it (None: no
    row reached it), over the finished rows and the rows waiting for an escalation step, each replayed as
    escalation runs it on the results it holds: from the first rung, merged over the rungs so far, while a field's
    decision is in `[escalate] on`. A row with results above the rung it stopped at (a pilot's, or an earlier
    ladder's) counts where the ladder would stop it, so a pilot's sample prices the climbs of the rows still to
    research. Verdicts are left out: a row still to research has none. For `enrich plan`'s estimate."""
    ladder, esc = cfg.ladder, cfg.escalate
    reached, climbed = [0] * len(ladder), [0] * len(ladder)
    if esc is None or len(ladder) < 2:
        return []

    def replay(results: list[tuple[str, str, Any]]) -> None:
        have = {p: json.loads(res) if isinstance(res, str) else res for p, _rid, res in results}
        for i, p in enumerate(ladder[:-1]):
            if p not in have:
                return
            reached[i] += 1
            merged = merge([(q, have[q]) for q in ladder[: i + 1] if q in have], fields, cfg.gate)
            if not needs_escalation(merged.decisions, esc.on):
                return
            climbed[i] += 1

    for chunk in journal.decided_rows(epoch, ladder):
        for *_row, results in chunk:
            replay(results)
    for chunk in journal.waiting_steps(epoch, ladder):
        for *_row, results in chunk:
            replay(results)
    return [climbed[i] / reached[i] if reached[i] else None for i in range(len(ladder) - 1)]


def escalate_pass(
    journal: Journal,
    cfg: RunConfig,
    epoch: int,
    fields: list[str],
    *,
    dry: bool = False,
    targets: Counter[str] | None = None,
) -> dict[str, int]:
    """One pass over finished rows; returns counts {climbed, fell_back, would_climb, checked, settled}. `targets`,
    when given, counts the rows that climb (or would, within max_rows) by the processor they climb to, less the
    steps waiting there that settle (or would).

    A step waiting to be sent (a row that climbed, no run created on the rung yet, e.g. the budget stopped the job)
    is decided again first: when its row no longer needs it (a reviewer decided the field in `on` since, or the
    gate or `on` changed), the row settles on its best earlier answer instead of paying for the step."""
    esc = cfg.escalate
    counts = {"climbed": 0, "fell_back": 0, "would_climb": 0, "checked": 0, "settled": 0}
    ladder = cfg.ladder
    settles: list[tuple[int, str, str]] = []
    if esc is not None:
        # twins (dedupe) share one step: it is saved only when none of them needs it any more
        needed: set[tuple[Any, str]] = set()
        leaders: Counter[tuple[Any, str]] = Counter()  # steps of their own (not waiting for a twin) that settle
        for chunk in journal.waiting_steps(epoch, ladder):
            verdicts = journal.verdicts_for([r[1] for r in chunk])
            for row_id, row_key, proc, waits, input_hash, results in chunk:
                group = (input_hash if journal.dedupe else row_id, proc)
                key = tuple(str(v) for v in json.loads(row_key))
                if needs_escalation(
                    decided(results, fields, cfg, key, verdicts.get(row_key), input_hash).decisions, esc.on
                ):
                    needed.add(group)
                    continue
                best = max(results, key=lambda r: strength(r[0]))  # the strongest answer so far is the row's run
                settles.append((row_id, best[1], best[0]))
                leaders[group] += 0 if waits else 1
        if targets is not None:
            for group, n in leaders.items():
                if group not in needed:
                    targets[group[1]] -= n
        if settles and not dry:
            journal.settle_steps(settles, time.time())
    room = math.inf
    if esc is not None and esc.max_rows is not None:
        held = journal.escalated_count(epoch, ladder[0]) - (len(settles) if dry else 0)
        room = max(0, esc.max_rows - held)
    moves: list[tuple[int, str]] = []
    falls: list[tuple[int, str]] = []
    for chunk in journal.decided_rows(epoch, ladder):
        verdicts = journal.verdicts_for([r[1] for r in chunk])
        for row_id, row_key, state, _proc, rung, input_hash, results in chunk:
            counts["checked"] += 1
            if state == "failed":  # an escalation step failed: keep the best earlier answer
                falls.append((row_id, results[-1][1]))
            if esc is None:
                continue
            key = tuple(str(v) for v in json.loads(row_key))
            merged = decided(results, fields, cfg, key, verdicts.get(row_key), input_hash)
            if not needs_escalation(merged.decisions, esc.on):
                continue
            tried = [p for p, _, _ in results] + ([rung] if rung else [])
            nxt = next_processor(ladder, tried)
            if nxt is None:
                continue
            counts["would_climb"] += 1
            if len(moves) < room:
                moves.append((row_id, nxt))
                if targets is not None:
                    targets[nxt] += 1
    if not dry:
        now = time.time()
        if falls:
            journal.fall_back(falls, now)
            journal.log("warning", f"{len(falls)} escalation run(s) failed; those rows keep their best earlier answer")
        if moves:
            journal.climb(moves, now)
    counts["climbed"], counts["fell_back"], counts["settled"] = len(moves), len(falls), len(settles)
    return counts
