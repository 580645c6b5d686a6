"""`enrich calibrate`: how often each confidence level was right in the user's own reviews.

A simulated reviewer (this test, holding the emulator's truth: its knowledge table) judges every
review line of an S&P 500 job; calibrate's figures must equal the rates computed here from the
truth, and its suggestions must point the right way.
"""

from __future__ import annotations

import csv
import json
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

from enrich.calibrate import calibration, judged, wilson
from enrich.config import config_from_mapping
from enrich.emulator.knowledge import norm_value
from tests.conftest import run_enrich, write_config
from tests.test_report_html import parse

FIELDS = {"headquarters_location": "string", "gics_sector": "string"}
TRUTH_COLUMNS = {"headquarters_location": "Headquarters Location", "gics_sector": "GICS Sector"}


def test_wilson_interval_matches_the_formula() -> None:
    """The 90% Wilson interval of known shares (values from the closed form), and the empty case."""
    low, high = wilson(9, 10)
    assert round(low, 3) == 0.652 and round(high, 3) == 0.977
    low, high = wilson(50, 100)
    assert round(low, 3) == 0.419 and round(high, 3) == 0.581
    assert wilson(0, 0) == (0.0, 1.0)


def test_only_the_latest_verdict_on_a_cell_counts_and_needs_what_was_reviewed() -> None:
    """A later verdict replaces an earlier one; a verdict without the reviewed answer or on a person's
    answer is not evidence about the API's confidence."""
    shown = json.dumps({"value": "x", "confidence": "medium", "processor": "base", "decision": "review"})
    human = json.dumps({"value": "y", "confidence": "human", "processor": "base", "decision": "human_corrected"})
    history = [
        ("r1", "f", "reject", shown),
        ("r1", "f", "accept", shown),  # the reviewer changed their mind: right
        ("r2", "f", "accept", None),  # recorded before enrich kept what was reviewed
        ("r3", "f", "accept", human),
        ("r4", "g", "correct", shown),
    ]
    assert sorted(judged(history)) == [("f", "medium", "base", True), ("g", "medium", "base", False)]


def test_calibrate_equals_the_truth_and_suggests_the_right_way(tmp_path: Path, sp500: Path) -> None:
    """Every review line of a 503-row job judged against the truth: calibrate's per-level counts and shares
    equal the ones computed from the truth, `high` reviewed and always right is suggested for accepting,
    `medium` (wrong in about a quarter of cells) is not; the run report carries the same calibration."""
    table = sp500
    truth = {}
    with table.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            truth[norm_value(row["Security"])] = row
    gate = '\n[gate.fields.gics_sector]\naccept = []\nreview = ["high", "medium"]\nreject = ["low", "none"]\n'
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=table,
        output=tmp_path / "out.csv",
        key=["Symbol"],
        columns=["Security"],
        fields=FIELDS,
        extra=gate,
        emulator=f'knowledge = "{table}"\nknowledge_key = "Security"\ntime_scale = 0\nhard_rate = 0.3\nseed = 3',
    )
    r = run_enrich("run", str(cfg), "--emulator")
    assert r.returncode == 0, r.stderr
    review = tmp_path / "out.review.csv"
    with review.open(encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    symbols = {}
    with table.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            symbols[row["Symbol"]] = row
    expected: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:  # the simulated reviewer: right is what the truth says
        right_value = symbols[line["Symbol"]][TRUTH_COLUMNS[line["field"]]]
        right = line["value"] == right_value
        line["verdict"] = "accept" if right else "correct"
        line["corrected_value"] = "" if right else right_value
        line["reviewer"] = "sim"
        cell = expected[(line["field"], line["confidence"], line["processor"])]
        cell[0] += int(right)
        cell[1] += 1
    with review.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows(lines)
    applied = run_enrich("review", "apply", str(cfg), str(review))
    assert applied.returncode == 0, applied.stderr

    out = run_enrich("calibrate", str(tmp_path / "out.csv.journal.sqlite"), "--json")
    assert out.returncode == 0, out.stderr
    cal = json.loads(out.stdout)
    got = {(lv["field"], lv["confidence"], lv["processor"]): [lv["right"], lv["reviewed"]] for lv in cal["levels"]}
    assert got == {k: v for k, v in expected.items()}
    medium = expected[("headquarters_location", "medium", "lite-fast")]
    assert medium[1] >= 20 and 0.5 < medium[0] / medium[1] < 0.95  # the emulator's weak tier is sometimes wrong
    actions = {(s["field"], s["confidence"]): s["action"] for s in cal["suggestions"]}
    assert actions[("gics_sector", "high")] == "accept"
    assert actions[("headquarters_location", "medium")] == "keep"
    assert "[gate.fields.gics_sector]" in cal["config_snippet"] and "headquarters_location" not in cal["config_snippet"]

    report = json.loads((tmp_path / "out.csv.report.json").read_text())
    assert report["calibration"]["levels"] == cal["levels"]
    page = (tmp_path / "out.report.html").read_text()
    assert 'id="calibration"' in page and parse(page).tags
    text = run_enrich("calibrate", str(cfg))
    assert text.returncode == 0 and "gics_sector: `high` was right in 100%" in text.stdout, text.stdout


def _cfg(tmp_path: Path, gate: dict[str, list[str]]) -> Any:
    return config_from_mapping(
        {
            "input": {"path": str(tmp_path / "in.csv"), "key": ["k"], "columns": ["k"]},
            "task": {"processor": "lite", "instruction": "x", "output": {"x": {"type": "string"}}},
            "output": {"path": str(tmp_path / "out.csv")},
            "gate": {"fields": {"x": gate}},
        }
    )


def _shown(level: str) -> str:
    return json.dumps({"value": "v", "confidence": level, "processor": "lite", "decision": "review"})


def test_every_move_on_one_field_lands_in_one_gate_table(tmp_path: Path) -> None:
    """`high` and `medium` both reviewed and always right: both moves in one `[gate.fields.x]` table (two
    tables for one field would not be valid TOML)."""
    cfg = _cfg(tmp_path, {"accept": [], "review": ["high", "medium"], "reject": ["low", "none"]})
    history = [(f"r{i}", "x", "accept", _shown("high" if i % 2 else "medium")) for i in range(80)]
    cal = calibration(cfg, history, {"x": {"high": 40, "medium": 40}}, 80)
    assert {(s["confidence"], s["action"]) for s in cal["suggestions"]} == {("high", "accept"), ("medium", "accept")}
    gate = tomllib.loads(cal["config_snippet"])["gate"]["fields"]["x"]
    assert gate == {"accept": ["high", "medium"], "review": [], "reject": ["low", "none"]}


def test_moves_that_would_unorder_the_gate_suggest_no_gate(tmp_path: Path) -> None:
    """`high` accepted but mostly wrong while `medium` reviewed is always right: no snippet that would accept
    medium above a reviewed high (the config refuses such a gate); it says why."""
    cfg = _cfg(tmp_path, {"accept": ["high"], "review": ["medium"], "reject": ["low", "none"]})
    history = [(f"h{i}", "x", "accept" if i < 10 else "reject", _shown("high")) for i in range(40)]
    history += [(f"m{i}", "x", "accept", _shown("medium")) for i in range(60)]
    cal = calibration(cfg, history, {"x": {"high": 40, "medium": 60}}, 100)
    assert cal["config_snippet"] == ""
    assert any("no gate is suggested" in s["text"] for s in cal["suggestions"])
