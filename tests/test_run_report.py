"""The run report's money, latency and estimate figures against the emulator's ledger, over loopback HTTP.

The demo job (configs/companies.toml: lite-fast, then base for rows with a rejected field) runs with
hard cells and failed runs; every figure is checked against what the API itself recorded.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from enrich.emulator import EmulatorConfig, EmulatorServer
from enrich.processors import PROCESSORS
from enrich.report import summary_lines
from tests.conftest import CANARY_KEY, ROOT, run_enrich
from tests.test_report_html import parse

CONFIG = str(ROOT / "configs" / "companies.toml")
KNOWLEDGE = str(ROOT / "data" / "companies_knowledge.csv")
KEY = {"x-api-key": CANARY_KEY}
ROWS = len((ROOT / "data" / "companies.csv").read_text().splitlines()) - 1


def _emulator(**kw: Any) -> EmulatorServer:
    return EmulatorServer(
        EmulatorConfig(knowledge=KNOWLEDGE, knowledge_key="company", hard_rate=0.25, time_scale=0.0, **kw)
    ).start()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo job once, with a tenth of the runs failing: its report, stderr, ledger and run states."""
    tmp = tmp_path_factory.mktemp("demo")
    emu = _emulator(fail_rate=0.1, seed=5)
    try:
        out = tmp / "companies.parquet"
        r = run_enrich("run", CONFIG, "--base-url", emu.base_url, "--output", str(out))
        assert r.returncode in (0, 3), r.stderr
        ledger = httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json()
        states = {
            e["run_id"]: httpx.get(f"{emu.base_url}/v1/tasks/runs/{e['run_id']}", headers=KEY, timeout=30).json()[
                "status"
            ]
            for e in ledger
        }
        yield {
            "report": json.loads(out.with_name(out.name + ".report.json").read_text()),
            "html": (tmp / "companies.report.html").read_text(encoding="utf-8"),
            "stderr": r.stderr,
            "ledger": ledger,
            "states": states,
        }
    finally:
        emu.stop()


def test_cost_by_processor_counts_every_paid_run_as_the_ledger_does(demo: dict[str, Any]) -> None:
    """Runs and cost per processor equal the API's ledger (failed and superseded runs too) and sum to the spend."""
    report, ledger = demo["report"], demo["ledger"]
    want: dict[str, list[int]] = {}
    for e in ledger:
        entry = want.setdefault(e["processor"], [0, 0])
        entry[0] += 1
        entry[1] += e["price_micros"]
    assert set(want) == {"lite-fast", "base"}  # the ladder was climbed
    assert "failed" in demo["states"].values()  # and some paid runs failed
    got = {p: [d["runs"], round(d["cost_usd"] * 1e6)] for p, d in report["cost_by_processor"].items()}
    assert got == want
    assert sum(m for _, m in got.values()) == round(report["spend_usd"] * 1e6) == sum(e["price_micros"] for e in ledger)
    assert report["runs_paid"] == len(ledger)
    page = parse(demo["html"]).values  # the HTML report shows the same figures
    for p, d in report["cost_by_processor"].items():
        assert json.loads(page[f"cost_by_processor.{p}.runs"]) == d["runs"]
        assert json.loads(page[f"cost_by_processor.{p}.cost_usd"]) == d["cost_usd"]


def test_latency_per_processor_covers_every_finished_run(demo: dict[str, Any]) -> None:
    """Latency counts per processor are the ledger's runs that finished (completed or failed), escalated or not."""
    finished = Counter(e["processor"] for e in demo["ledger"] if demo["states"][e["run_id"]] in ("completed", "failed"))
    lat = demo["report"]["latency_s"]
    assert {p: d["count"] for p, d in lat["by_processor"].items()} == dict(finished)
    assert lat["count"] == len(demo["ledger"]) == sum(lat["histogram"]["counts"])


def test_end_of_run_summary_names_decisions_review_file_and_report(demo: dict[str, Any]) -> None:
    """stderr gives per-field decision counts, the review file and its line count, the reports and the spend."""
    report = demo["report"]
    lines = [ln.removeprefix("enrich:").strip() for ln in demo["stderr"].splitlines()]
    fields = []
    for col, counts in sorted(report["decision_counts"].items()):
        order = [k for k in ("accepted", "review", "rejected") if k in counts]
        fields.append(f"{col.removesuffix('__decision')} " + ", ".join(f"{k} {counts[k]}" for k in order))
    assert "decisions: " + "; ".join(fields) in lines
    review = Path(report["review_file"])
    with review.open(encoding="utf-8", newline="") as f:
        n = sum(1 for _ in csv.reader(f)) - 1  # the header
    assert n > 0 and f"review file: {review} ({n} lines: one per (row, field) in review or still rejected)" in lines
    assert f"report: {report['report_files'][0]}, {report['report_files'][1]}" in lines
    assert all(Path(p).is_file() for p in report["report_files"])
    cbp = report["cost_by_processor"]
    assert (
        f"paid runs: {len(demo['ledger'])} for ${report['spend_usd']:.4f} (lite-fast {cbp['lite-fast']['runs']} for "
        f"${cbp['lite-fast']['cost_usd']:.4f}, base {cbp['base']['runs']} for ${cbp['base']['cost_usd']:.4f})"
    ) in lines
    wrote = next(i for i, ln in enumerate(lines) if ln.startswith("wrote "))
    assert lines[wrote + 1].startswith("paid runs: ")  # the summary sits under the outcome line


def test_summary_leaves_out_fields_without_decisions() -> None:
    """An interrupt before any row completed: no bare `decisions: a ; b ` line; a field with none is left out."""
    assert not any(ln.startswith("decisions") for ln in summary_lines({"decision_counts": {"a__decision": {}}}))
    both = {"decision_counts": {"a__decision": {"accepted": 2}, "b__decision": {}}}
    assert "decisions: a accepted 2" in summary_lines(both)


def _usd(micros: float) -> str:
    return f"${micros / 1e6:,.2f}"


def test_plan_estimate_includes_the_ladder(tmp_path: Path) -> None:
    """Fresh: first step to every rung; after the first step: exactly what the escalation then spends."""
    out = str(tmp_path / "companies.parquet")
    lite, base = PROCESSORS["lite-fast"].price_micros, PROCESSORS["base"].price_micros
    fresh = run_enrich("plan", CONFIG, "--output", out)
    assert fresh.returncode == 0, fresh.stderr
    assert f"estimated cost       {_usd(ROWS * lite)} - {_usd(ROWS * (lite + base))}  " in fresh.stdout
    emu = _emulator(seed=5)  # no failures: each row climbs at most once, as the plan assumes
    try:
        first = run_enrich(
            "run", CONFIG, "--base-url", emu.base_url, "--output", out, "--budget", str(ROWS * lite / 1e6)
        )
        assert first.returncode == 4, first.stderr  # the budget held exactly the first step
        spent_first = len(httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json()) * lite
        plan = run_enrich("plan", CONFIG, "--output", out)
        assert plan.returncode == 0, plan.stderr
        rest = run_enrich("run", CONFIG, "--base-url", emu.base_url, "--output", out)
        assert rest.returncode == 0, rest.stderr
        ledger = httpx.get(emu.base_url + "/_emulator/ledger", timeout=30).json()
    finally:
        emu.stop()
    escalation = sum(e["price_micros"] for e in ledger) - spent_first
    assert escalation > 0 and {e["processor"] for e in ledger} == {"lite-fast", "base"}
    assert f"estimated cost       {_usd(escalation)}  (spent so far {_usd(spent_first)})" in plan.stdout
    assert sum(e["price_micros"] for e in ledger) <= ROWS * (lite + base)  # within the fresh plan's worst case


def test_summary_says_which_paid_runs_are_only_reservations_in_doubt() -> None:
    """Rows left `unknown` (a reply lost, not yet reconciled) are counted as paid: the summary says they are in doubt."""
    report = {
        "cost_by_processor": {"lite-fast": {"runs": 55, "cost_usd": 0.275}},
        "runs_paid": 55,
        "spend_usd": 0.275,
        "status_counts": {"unknown": 55},
    }
    lines = summary_lines(report)
    assert lines[0].startswith("paid runs: 55 for $0.2750")
    assert lines[1].startswith("in doubt: 55 rows whose run may or may not exist")
    assert not any("in doubt" in line for line in summary_lines({**report, "status_counts": {"completed": 55}}))
