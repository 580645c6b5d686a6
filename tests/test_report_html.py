"""The HTML run report: same numbers as the JSON report, hostile text escaped, small, renders in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from enrich.report import domain_of, percentiles
from enrich.report_html import render_html
from tests.conftest import ROOT, run_enrich, write_config

CHARTS = {"status", "money", "processors", "latency", "confidence", "fill", "domains"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page(HTMLParser):
    """Collects tags, data-key/data-value pairs and chart ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.values: dict[str, str] = {}
        self.charts: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("data-key") is not None:
            self.values[a["data-key"] or ""] = a.get("data-value") or ""
        if a.get("data-chart"):
            self.charts.add(a["data-chart"] or "")


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def lookup(report: dict[str, Any], dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        node = (
            node[int(part)][1] if isinstance(node, list) else node.get(part, 0 if "status_counts" in dotted else None)
        )
    return node


def run_job(tmp_path: Path, rows: int, emulator_process: Any) -> tuple[dict[str, Any], str, Path]:
    emu = emulator_process("--time-scale", "0", "--fail-rate", "0.02")
    inp = tmp_path / "in.csv"
    inp.write_text(
        "company\n"
        + "".join(f"Company {i}\n" for i in range(rows - 5))
        + "Apple\nMicrosoft\nNvidia\nAlphabet\nAmazon\n"
    )
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=inp,
        output=tmp_path / "out.parquet",
        key=["company"],
        columns=["company"],
        fields={"headquarters_location": "string", "founded_year": "integer"},
        limits="budget_usd = 100",
    )
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert r.returncode in (0, 3), r.stderr
    report = json.loads((tmp_path / "out.parquet.report.json").read_text())
    html_path = tmp_path / "out.report.html"
    return report, html_path.read_text(encoding="utf-8"), html_path


def test_every_number_in_the_html_is_the_json_reports(tmp_path: Path, emulator_process) -> None:
    """Each figure in the page carries its JSON key, and its value equals the JSON report's."""
    report, text, _ = run_job(tmp_path, 300, emulator_process)
    page = parse(text)
    assert page.charts >= CHARTS
    assert len(page.values) > 30
    for key, value in page.values.items():
        assert json.loads(value) == lookup(report, key), key
    assert report["latency_s"]["count"] == sum(report["latency_s"]["histogram"]["counts"])
    assert report["rows"] == 300 and sum(report["status_counts"].values()) == 300


def test_ten_thousand_rows_report_is_small_and_self_contained(tmp_path: Path, emulator_process) -> None:
    """A 10,000-row job's page is under 1 MB and references nothing outside itself."""
    report, text, path = run_job(tmp_path, 10_000, emulator_process)
    assert report["rows"] == 10_000
    assert path.stat().st_size < 1_000_000, path.stat().st_size
    page = parse(text)
    for tag, attrs in page.tags:
        for name in ("src", "href", "xlink:href"):
            assert not (attrs.get(name) or "").startswith(("http:", "https:", "//")), (tag, attrs)
        assert tag not in ("script", "link", "iframe", "img", "object")
    assert "Content-Security-Policy" in text


def test_hostile_report_values_are_escaped() -> None:
    """Labels from the web cannot inject markup: no script, no handler attributes, text escaped."""
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    report = {
        "rows": 2,
        "emulated": False,
        "output": f"/tmp/{evil}.csv",
        "processor": evil,
        "status_counts": {"completed": 2},
        "spend_usd": 0.01,
        "confidence_counts": {"hq": {evil: 1, "high": 1}},
        "latency_s": percentiles([0.1, 0.3]),
        "top_cited_domains": [[domain_of(f"https://{evil}/"), 1], ["ok.example", 1]],
        "fill_rate": {"hq": 1.0},
        "hit_rate": 1.0,
        "decision_counts": {"hq__decision": {evil: 1, "accepted": 1}},
        "error_sample": evil,
    }
    report["latency_s"]["by_processor"] = {}
    text = render_html(report)
    page = parse(text)
    assert all(tag not in ("script", "img", "iframe") for tag, _ in page.tags)
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    assert "<script" not in text and "onerror=alert" not in text.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;" in text


def test_emulated_runs_are_marked() -> None:
    """An emulated run shows a prominent EMULATED banner; a live one does not."""
    base = {"rows": 0, "status_counts": {}, "spend_usd": 0, "confidence_counts": {}, "latency_s": percentiles([])}
    assert 'id="emulated"' in render_html({**base, "emulated": True})
    assert 'id="emulated"' not in render_html({**base, "emulated": False})


@pytest.mark.parametrize(
    ("url", "domain"),
    [
        ("https://www.Example.com/a", "example.com"),
        ("http://sub.ex-ample.org:8080/x", "sub.ex-ample.org"),
        ("javascript:alert(1)", "(invalid)"),
        ("https://<b>/", "(invalid)"),
        ("not a url", "(invalid)"),
    ],
)
def test_domain_of(url: str, domain: str) -> None:
    """Citation domains are plain host names or '(invalid)'."""
    assert domain_of(url) == domain


def test_init_then_run_unchanged(tmp_path: Path) -> None:
    """`enrich init data/companies.csv` writes a config `enrich run --emulator` accepts as is; never overwrites."""
    data = tmp_path / "companies.csv"
    shutil.copy(ROOT / "data" / "companies.csv", data)
    r = run_enrich("init", str(data), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "enrich plan companies.toml" in r.stdout and "enrich run companies.toml --emulator" in r.stdout
    before = (tmp_path / "companies.toml").read_text()
    again = run_enrich("init", str(data), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (tmp_path / "companies.toml").read_text() == before
    run = run_enrich("run", "companies.toml", "--emulator", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "companies.enriched.csv").exists()
    assert (tmp_path / "out" / "companies.enriched.report.html").exists()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium); the HTML report is not checked in a browser",
)
def test_report_renders_in_headless_chromium(tmp_path: Path, emulator_process) -> None:
    """Chromium renders the page with no console errors, every chart drawn; the screenshot goes to docs/."""
    _, _, html_path = run_job(tmp_path, 300, emulator_process)
    profile = tempfile.mkdtemp(prefix="enrich-chromium-")
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,2300",
    ]
    try:
        dom = subprocess.run([*common, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
        shot = tmp_path / "report.png"
        pic = subprocess.run(
            [*common, f"--screenshot={shot}", html_path.as_uri()], capture_output=True, text=True, timeout=120
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in (dom.stderr + pic.stderr).splitlines() if "CONSOLE" in ln or "Content Security" in ln]
    assert console == [], console
    page = parse(dom.stdout)
    assert page.charts >= CHARTS
    # every chart figure holds a drawn SVG (marks rendered, not an empty element)
    for chart in CHARTS:
        start = dom.stdout.index(f'id="chart-{chart}"')
        figure = dom.stdout[start : dom.stdout.index("</figure>", start)]
        assert "<svg" in figure and "<path" in figure, chart
    assert shot.exists() and shot.stat().st_size > 20_000
    if os.environ.get("ENRICH_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "report.png")


def test_chart_labels_drop_direction_overrides_and_long_ones_stay_distinct() -> None:
    """A label cannot reorder what it shows (bidi controls dropped), and long labels that do not fit keep both
    ends (`start…end`, the whole label as a tooltip), so fields that share a long prefix stay apart."""
    from enrich.report_html import label

    assert label("ltr_\u202eevil\u2066x") == "ltr_evilx"
    fields = {f"field_{i:02d}_with_a_rather_long_descriptive_name": 1.0 for i in range(3)}
    report = {
        "rows": 1,
        "status_counts": {"completed": 1},
        "spend_usd": 0,
        "confidence_counts": {},
        "latency_s": percentiles([0.1]),
        "fill_rate": fields,
        "hit_rate": 1.0,
    }
    report["latency_s"]["by_processor"] = {}
    text = render_html(report)
    start = text.index('id="chart-fill"')
    chart = text[start : text.index("</figure>", start)]
    shown = [t.split("<title>")[0] for t in chart.split('text-anchor="end">')[1:]]
    assert len({s for s in shown if s.startswith("field_")}) == 3, shown
    assert all(len(s) <= 32 for s in shown), shown
