"""Run statistics for the JSON report (and, rendered from that report alone, the HTML one).

`RunStats` sees every output row once while the writer streams the journal, so memory
stays flat: latencies go to a bounded reservoir (exact percentiles up to LATENCY_SAMPLE
rows) and to fixed 1-2-5 histogram bins (exact counts at any size); domains, fills and
decisions are counters. `numbers()` turns it into plain JSON values. The HTML report draws
only what is in the JSON report, so the two can never disagree.

Definitions (also printed in the HTML):
    latency      finished - created of every run whose outcome was recorded (journal clock), completed or
                 failed, whether or not its answer is the one kept (an escalation step's first run counts)
    runs, cost   per processor, every run paid for or reserved in the journal's spend table: completed,
                 failed, timed out, superseded or in doubt (the API bills a run once created); the costs
                 sum to the spend
    hit rate     rows with at least one non-empty value / all rows
    fill rate    rows with a non-empty value for the field / all rows
    CPM          spend / completed rows x 1,000 (what 1,000 answered rows actually cost)
    estimate     all rows x the processor's list price (the plan's figure for a fresh job); with an
                 escalation ladder also the worst case, every row run on every rung
"""

from __future__ import annotations

import json
import math
import random
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from enrich.processors import PROCESSORS, strength

UNATTRIBUTED = "(unattributed)"  # spend a journal from before per-processor accounting cannot place
LATENCY_SAMPLE = 20_000
TOP_DOMAINS = 15
MAX_DOMAINS = 50_000  # distinct domains tracked; later new ones count as "(other)"
_EDGES = [0.0] + [m * 10.0**e for e in range(-2, 5) for m in (1, 2, 5)]  # 0, 0.01, 0.02, ... 50000 s
_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$")


def domain_of(url: Any) -> str:
    """The citation's host without `www.`, or '(invalid)': `domain_of('https://www.Example.com/a')` -> 'example.com'.

    Only plain host names come back, so nothing from the web reaches the report verbatim.
    """
    try:
        host = (urlsplit(str(url)).hostname or "").rstrip(".")
    except ValueError:
        return "(invalid)"
    host = host.removeprefix("www.")
    return host if host and len(host) <= 253 and _HOST.match(host) else "(invalid)"


def percentiles(sorted_values: list[float]) -> dict[str, float | int | None]:
    """count, mean, p50/p90/p95/p99 (nearest rank below) and max of sorted seconds, rounded to ms."""
    n = len(sorted_values)
    if not n:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return round(sorted_values[int(q * (n - 1))], 3)

    return {
        "count": n,
        "mean": round(math.fsum(sorted_values) / n, 3),
        "p50": at(0.5),
        "p90": at(0.9),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(sorted_values[-1], 3),
    }


def _bin(value: float) -> int:
    """The histogram bin i with _EDGES[i] <= value < _EDGES[i + 1] (the last bin is open); value >= 0."""
    return bisect_right(_EDGES, value) - 1  # C bisect: the report reads every run once (a million at P7)


class _Latencies:
    def __init__(self, rand: random.Random):
        self.sample: list[float] = []
        self.seen = 0
        self.bins = [0] * len(_EDGES)
        self._rand = rand
        self.total = 0.0

    def add(self, value: float) -> None:
        self.seen += 1
        self.total += value
        self.bins[_bin(value)] += 1
        if len(self.sample) < LATENCY_SAMPLE:
            self.sample.append(value)
        elif (j := self._rand.randrange(self.seen)) < LATENCY_SAMPLE:
            self.sample[j] = value

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(percentiles(sorted(self.sample)))
        out["count"] = self.seen  # exact, even when percentiles come from a sample
        out["mean"] = round(self.total / self.seen, 3) if self.seen else None
        used = [i for i, c in enumerate(self.bins) if c]
        if used:
            lo, hi = used[0], used[-1]
            out["histogram"] = {
                "edges_s": [_EDGES[i] for i in range(lo, hi + 1)] + [_edge_after(hi)],
                "counts": self.bins[lo : hi + 1],
            }
        else:
            out["histogram"] = {"edges_s": [], "counts": []}
        return out


def _edge_after(i: int) -> float | None:
    return _EDGES[i + 1] if i + 1 < len(_EDGES) else None


class RunStats:
    """Per-row accumulator; `add()` once per output row, `numbers()` at the end."""

    def __init__(
        self,
        fields: dict[str, Any],
        columns: list[tuple[str, str, Any, str, str]],
        processor: str,
        ladder: list[str] | None = None,
        row_latencies: bool = True,
    ):
        self.fields = list(fields)
        self.value_cols = {f: [c[0] for c in columns if c[3] == f and c[4] == "value"] for f in fields}
        self.citation_cols = [c[0] for c in columns if c[4] == "citations"]
        self.decision_cols = [c[0] for c in columns if c[0].endswith("__decision") or c[0] == "_enrich_decision"]
        self.processor = processor
        self.ladder = [p for p in ladder or [processor] if p in PROCESSORS]
        self.row_latencies = row_latencies  # False: numbers() gets every run's latency from the journal
        rand = random.Random(0)
        self.all = _Latencies(rand)
        self.by_proc: dict[str, _Latencies] = {}
        self._rand = rand
        self.filled: Counter[str] = Counter()
        self.answered = 0
        self.domains: Counter[str] = Counter()
        self.citations = 0
        self.decisions: dict[str, Counter[str]] = {c: Counter() for c in self.decision_cols}

    def add(
        self,
        state: str,
        flat: dict[str, Any],
        result: dict[str, Any] | None,
        submitted_at: float | None,
        finished_at: float | None,
    ) -> float | None:
        """Count one row; return its latency in seconds (None while it has no finished run)."""
        latency = None
        proc = self.processor
        run = result.get("run") if isinstance(result, dict) else None
        if isinstance(run, dict) and isinstance(run.get("processor"), str) and run["processor"] in PROCESSORS:
            proc = run["processor"]
        if submitted_at and finished_at and state in ("done", "failed"):
            latency = round(max(0.0, finished_at - submitted_at), 3)
            if self.row_latencies:
                self.all.add(latency)
                if (lat := self.by_proc.get(proc)) is None:
                    lat = self.by_proc[proc] = _Latencies(self._rand)
                lat.add(latency)
        if state == "done":
            any_value = False
            for f, cols in self.value_cols.items():
                if any(_present(flat.get(c)) for c in cols):
                    self.filled[f] += 1
                    any_value = True
            self.answered += any_value
            for c in self.citation_cols:
                for url in flat.get(c) or ():
                    self.citations += 1
                    d = domain_of(url)
                    if d in self.domains or len(self.domains) < MAX_DOMAINS:
                        self.domains[d] += 1
                    else:
                        self.domains["(other)"] += 1
        for c in self.decision_cols:
            if (v := flat.get(c)) is not None:
                self.decisions[c][str(v)] += 1
        return latency

    def numbers(
        self,
        rows: int,
        spend_micros: int,
        completed: int,
        budget_usd: float | None,
        paid: dict[str | None, tuple[int, int]],
        run_latencies: Iterable[tuple[str | None, float]] | None,
    ) -> dict[str, Any]:
        """The report entries this module owns, as JSON values.

        `paid` is `Journal.paid_by_processor()` and `run_latencies` `Journal.run_latencies()`: every run, not
        only those whose answer is shown. Without run latencies (an old journal, read-only) the latencies of
        the rows' own runs stand in."""
        price = PROCESSORS[self.processor].price_micros if self.processor in PROCESSORS else 0
        if run_latencies is not None:
            rand = random.Random(0)
            self.all, self.by_proc = _Latencies(rand), {}
            for proc, seconds in run_latencies:  # a million runs at P7: keep this loop lean
                self.all.add(seconds)
                if (lat := self.by_proc.get(proc or UNATTRIBUTED)) is None:
                    lat = self.by_proc[proc or UNATTRIBUTED] = _Latencies(rand)
                lat.add(seconds)
        latency = self.all.summary()
        out: dict[str, Any] = {
            "latency_s": {**latency, "by_processor": {p: lat.summary() for p, lat in sorted(self.by_proc.items())}},
            "run_duration_s": {k: latency[k] for k in ("p50", "p95", "max")},  # kept for older readers
            "budget_usd": budget_usd,
            "estimated_cost_usd": round(rows * price / 1e6, 6),
            "cpm_usd": round(spend_micros / completed * 1000 / 1e6, 6) if completed else None,
            "runs_paid": sum(n for n, _ in paid.values()),
            "cost_by_processor": {
                p or UNATTRIBUTED: {
                    "runs": n,
                    "cost_usd": round(micros / 1e6, 6),
                    "usd_per_1000_runs": PROCESSORS[p].usd_per_1000 if p in PROCESSORS else None,
                }
                for p, (n, micros) in sorted(paid.items(), key=lambda kv: strength(kv[0] or ""))
            },
            "rows_with_answer": self.answered,
            "hit_rate": round(self.answered / rows, 4) if rows else None,
            "fill_counts": {f: self.filled[f] for f in self.fields},
            "fill_rate": {f: round(self.filled[f] / rows, 4) if rows else None for f in self.fields},
            "citations": self.citations,
            "top_cited_domains": [[d, n] for d, n in self.domains.most_common(TOP_DOMAINS)],
        }
        if len(self.ladder) > 1:
            out["ladder_worst_case_usd"] = round(rows * sum(PROCESSORS[p].price_micros for p in self.ladder) / 1e6, 6)
        if self.decision_cols:
            out["decision_counts"] = {c: dict(v) for c, v in self.decisions.items()}
        return out


def _present(v: Any) -> bool:
    return v is not None and v != "" and v != []


_DECISION_ORDER = ("accepted", "review", "rejected", "human_accepted", "human_corrected", "human_rejected")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The end-of-run summary printed under `wrote N rows ...`: runs and spend per processor, decisions per
    field, the review file and the report files (whatever of these the report holds)."""
    lines = []
    if cbp := report.get("cost_by_processor"):
        lines.append(
            f"paid runs: {report.get('runs_paid', sum(d['runs'] for d in cbp.values()))} for "
            f"${report.get('spend_usd', 0):.4f} ("
            + ", ".join(
                f"{p} {d['runs']} for ${d['cost_usd']:.4f}"
                for p, d in sorted(cbp.items(), key=lambda kv: strength(kv[0]))
            )
            + ")"
        )
        if doubt := (report.get("status_counts") or {}).get("unknown"):
            # a reservation is counted above as paid until reconciliation finds the run or releases it
            lines.append(
                f"in doubt: {doubt:,} row{'s' if doubt != 1 else ''} whose run may or may not exist; their reservations "
                "count as paid until the next run reconciles them (paying for a run that exists, releasing the rest)"
            )
    if said := reuse_line(report.get("reuse") or {}):
        lines.append(said)
    if decisions := {col: counts for col, counts in (report.get("decision_counts") or {}).items() if counts}:
        per_field = []  # a field with no decision yet (no row completed) is left out, not printed bare
        for col, counts in sorted(decisions.items()):  # sorted: the same order when read back from the JSON
            order = sorted(counts, key=lambda k: (_DECISION_ORDER.index(k) if k in _DECISION_ORDER else 99, k))
            name = col.removesuffix("__decision")
            per_field.append(f"{name} " + ", ".join(f"{k} {counts[k]}" for k in order))
        lines.append("decisions: " + "; ".join(per_field))
    if report.get("review_file"):
        n = report.get("review_lines", 0)
        lines.append(
            f"review file: {report['review_file']} ({n} line{'s' if n != 1 else ''}"
            + (": one per (row, field) in review or still rejected)" if n else ": nothing to review)")
        )
    if files := report.get("report_files"):
        lines.append("report: " + ", ".join(files))
    return lines


def result_summary(report: dict[str, Any], output: Any, emulated: bool, knowledge_key: str) -> str:
    """The first line(s) a run prints: rows written and how they ended, spend, and for an emulated run whose
    emulator answered nothing, why."""
    sc = report["status_counts"]
    summary = (
        f"wrote {report['rows']} rows to {output} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(sc.items()))}); spent ${report['spend_usd']:.4f}"
        f"{' [EMULATED]' if emulated else ''}"
    )
    if emulated and report.get("rows_with_answer") == 0 and sc.get("completed"):
        summary += (
            f"\nwarning: the emulator answered no field for any row: either no input row matches its "
            f"knowledge table on column {knowledge_key!r}, or the table has no column named "
            "like the output fields; set [emulator] knowledge and knowledge_key (README, The emulator)"
        )
    return summary


def run_lines(message: str, report: dict[str, Any]) -> list[str]:
    """What `enrich run` prints at the end, line by line: the message's first line, the summary under it,
    then the rest of the message (so the last line still says how the job ended)."""
    first, *rest = message.splitlines() or [""]
    return [first, *(f"  {s}" for s in summary_lines(report)), *rest]


def reuse_line(reuse: dict[str, Any]) -> str | None:
    """The summary line for what reuse saved (reuse.summary): twins sharing a run, the shared cache, `where`."""
    said = []

    def rows(n: int) -> str:
        return f"{n:,} row{'s' if n != 1 else ''}"

    if n := reuse.get("rows_sharing_a_run"):
        said.append(
            f"{rows(n)} took the run of an identical row ({reuse.get('distinct_inputs', 0):,} distinct inputs; "
            f"${reuse.get('dedupe_saved_usd', 0):.4f} not paid)"
        )
    if n := reuse.get("rows_from_cache"):
        said.append(
            f"{rows(n)} served from the results cache ({reuse.get('cache_results_used', 0):,} results; "
            f"${reuse.get('cache_saved_usd', 0):.4f} not paid)"
        )
    if n := reuse.get("rows_skipped"):
        said.append(f"{rows(n)} skipped by [input] where (not researched)")
    return "reuse: " + "; ".join(said) if said else None


def read_report(path: Path) -> dict[str, Any] | None:
    """A run report as written (`<output>.report.json`), or None when it is missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
