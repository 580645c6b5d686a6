"""The review page in a real browser: headless Chromium (the system's, driven by Playwright) presses the keys,
hostile research never runs, 10,000 lines page; a screenshot of the page goes to docs/."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import polars as pl
import pytest

from enrich.config import load_config
from enrich.job import run_job
from enrich.journal import Journal
from enrich.preflight import EMULATOR_KEY
from enrich.review_page.session import Session
from tests.conftest import ROOT, write_config
from tests.review_helpers import HOSTILE_ROWS, make_job, origin, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # a machine without the dev extras
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed (apt-get install chromium): the review page is not checked in a browser",
    ),
    pytest.mark.skipif(
        sync_playwright is None,
        reason="playwright is not installed (pip install -e '.[dev]'): the review page is not checked in a browser",
    ),
]

# what the page's DOM holds after rendering: anything the research could have injected shows up here
DOM_CHECK = """() => ({
  pwned: window.__pwned === undefined ? null : window.__pwned,
  scripts: [...document.scripts].map(s => s.src),
  handlers: [...document.querySelectorAll('*')].flatMap(
      e => [...e.attributes].filter(a => a.name.startsWith('on')).map(a => e.tagName + ' ' + a.name)),
  injected: document.querySelectorAll('img, svg, iframe, object, embed, frame').length,
  links: [...document.links].map(a => [a.getAttribute('href'), a.target, a.rel]),
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert sync_playwright is not None and CHROMIUM is not None
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM, args=["--disable-gpu", "--no-first-run", "--disable-background-networking"]
        )
        yield chromium
        chromium.close()


class Watch:
    """A tab with everything that must not happen recorded: dialogs, requests leaving the server, script errors."""

    def __init__(self, browser: Browser, server_origin: str, width: int = 1280, height: int = 900):
        self.page: Page = browser.new_page(viewport={"width": width, "height": height})
        self.dialogs: list[str] = []
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: None if r.url.startswith(server_origin + "/") else self.outside.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("popup", lambda p: self.outside.append(f"popup {p.url}"))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def key(self, key: str) -> None:
        """Press a key that navigates (a verdict, j/k/o), and wait for the next page."""
        with self.page.expect_navigation():
            self.page.keyboard.press(key)

    def counters(self) -> tuple[int, int]:
        done, left = (self.page.inner_text(s).replace(",", "") for s in ("#done", "#left"))
        return int(done), int(left)

    def quiet(self) -> None:
        assert (self.dialogs, self.outside, self.errors) == ([], [], [])


def test_keys_decide_three_items_and_hostile_research_stays_inert(tmp_path: Path, browser: Browser) -> None:
    """Chromium: every item page renders hostile research as text (no dialog, script, handler or navigation);
    a, c + typed value + Enter, r decide three items; `write output` writes human_* decisions; no token, no page."""
    cfg = make_job(tmp_path, HOSTILE_ROWS)
    lines = Session(cfg).view().queue.lines
    with serving(cfg, reviewer="dee") as (server, _):
        tab = Watch(browser, origin(server))
        page = tab.page
        for line in lines:  # every item page, as rendered
            page.goto(server.url + "item?" + urlencode({"row": line.row_key, "field": line.field}))
            dom = page.evaluate(DOM_CHECK)
            assert dom["pwned"] is None and dom["handlers"] == [] and dom["injected"] == 0
            assert dom["scripts"] == [server.url + "static/review.js"]
            for href, target, rel in dom["links"]:
                if href.startswith("/"):
                    continue
                assert href.startswith(("http://", "https://")) and (target, rel) == ("_blank", "noopener noreferrer")
            body = page.inner_text("body")
            assert line.key[0] in body
        page.goto(server.url)
        assert tab.counters() == (0, len(lines))
        tab.key("o")  # the first line
        acme = page.inner_text("body")
        assert HOSTILE_ROWS[0]["company"] in acme and "javascript:window.__pwned=8;alert(8)" in acme
        first = (page.inner_text("#key"), page.inner_text("#field"))
        tab.key("j")
        assert (page.inner_text("#key"), page.inner_text("#field")) != first
        tab.key("k")
        assert (page.inner_text("#key"), page.inner_text("#field")) == first
        decided = []
        for step in ("a", "c", "r"):
            key, field = page.inner_text("#key"), page.inner_text("#field")
            typed = "1901" if field == "founded_year" else "Typed in <b>Chromium</b>"
            if step == "c":
                page.keyboard.press("c")
                assert page.evaluate("document.activeElement.id") == "corrected"
                page.keyboard.type(typed)  # replaces the selected value
                tab.key("Enter")
            else:
                tab.key(step)
            decided.append((key, field, typed))
            assert "no more lines" not in page.inner_text("body")
        page.click("#back")
        assert tab.counters() == (3, len(lines) - 3)
        with page.expect_navigation():
            page.click("#write")
        assert "wrote " in page.inner_text("#flash")
        tab.quiet()
        for path in ("/", f"/{'x' * len(server.token)}/", "/static/review.js"):
            response = page.goto(origin(server) + path)
            assert response is not None and response.status == 403
        assert tab.dialogs == [] and [u for u in tab.outside if not u.startswith("popup")] == []
    journal = Journal.open(tmp_path / "out.parquet.journal.sqlite", readonly=True)
    try:
        stored = journal.conn.execute(
            "SELECT row_key, field, verdict, corrected_json, reviewer FROM verdicts"
        ).fetchall()
    finally:
        journal.close()
    assert [(json.loads(k)[0], f, v, r) for k, f, v, _, r in stored] == [
        (c, f, v, "dee") for (c, f, _), v in zip(decided, ["accept", "correct", "reject"], strict=True)
    ]
    c, f, typed = decided[1]
    expected = 1901 if f == "founded_year" else typed
    assert json.loads(stored[1][3]) == expected
    out = pl.read_parquet(tmp_path / "out.parquet")
    at = {name: i for i, name in enumerate(out["company"].to_list())}
    assert [out[f"{f}__decision"][at[c]] for c, f, _ in decided] == [
        "human_accepted",
        "human_corrected",
        "human_rejected",
    ]
    assert out[f][at[c]] == expected and out[decided[2][1]][at[decided[2][0]]] is None


def test_enter_in_the_reviewer_field_records_no_verdict(tmp_path: Path, browser: Browser) -> None:
    """Chromium: typing a name in the reviewer field and pressing Enter stays on the line; nothing is recorded."""
    cfg = make_job(tmp_path, HOSTILE_ROWS)
    with serving(cfg, reviewer="dee") as (server, _):
        tab = Watch(browser, origin(server))
        page = tab.page
        page.goto(server.url)
        tab.key("o")
        at = page.url
        # the form's submit event fires during the key's default action; held here, it shows whether Enter sent it
        page.evaluate(
            "document.getElementById('decide').addEventListener('submit', e => { window.__sent = true; "
            "e.preventDefault(); })"
        )
        page.click("#reviewer")
        page.keyboard.type(" lee")
        page.keyboard.press("Enter")
        assert page.evaluate("window.__sent === undefined") and page.url == at
        page.goto(server.url)
        assert tab.counters()[0] == 0
        tab.quiet()
    journal = Journal.open(tmp_path / "out.parquet.journal.sqlite", readonly=True)
    try:
        assert journal.conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 0
    finally:
        journal.close()


def test_ten_thousand_lines_page_in_chromium(ten_thousand: Path, browser: Browser) -> None:
    """Chromium with 10,000 review lines: 50 a page, j / k turn pages, o opens a line, a accepts it."""
    with serving(ten_thousand) as (server, _):
        tab = Watch(browser, origin(server))
        page = tab.page
        page.goto(server.url)
        done, left = tab.counters()
        assert done + left == 10_000
        assert page.locator("#queue tbody tr").count() == 50 and page.inner_text("#pages") == str((left + 49) // 50)
        tab.key("j")
        assert page.inner_text("#page") == "2" and page.locator("#queue tbody tr").count() == 50
        first_of_two = page.inner_text("#queue tbody tr:first-child td.n")
        assert first_of_two == "51"
        tab.key("k")
        assert page.inner_text("#page") == "1"
        tab.key("o")
        tab.key("a")
        page.click("#back")
        assert tab.counters() == (done + 1, left - 1)
        page.goto(server.url + f"?page={(left + 48) // 50}")
        assert page.locator("#queue tbody tr").count() == ((left - 1) % 50 or 50) and 'id="next"' not in page.content()
        tab.quiet()


def test_review_page_screenshot(tmp_path: Path, browser: Browser, monkeypatch: pytest.MonkeyPatch) -> None:
    """The companies demo job's review page renders (an item with evidence, the queue); screenshots go to docs/."""
    monkeypatch.chdir(tmp_path)  # the page shows the output's path as typed here: out/...
    (tmp_path / "out").mkdir()
    src = ROOT / "data" / "companies.csv"
    cfg = write_config(
        tmp_path / "companies.toml",
        input_path=src,
        output=tmp_path / "out" / "companies.enriched.parquet",
        key=["company"],
        columns=["company", "website"],
        fields={"headquarters_location": "string", "founded_year": "integer", "founders": "array"},
        limits="max_in_flight = 500\nrequests_per_minute = 100000",
        emulator="time_scale = 0\nrate_limit = 0\nhard_rate = 0.25",
    )
    text = cfg.read_text().replace('type = "array"', 'type = "array"\nitems = { type = "string" }')
    cfg.write_text(text + '\n[escalate]\nprocessors = ["base"]\non = ["rejected"]\n')
    assert run_job(load_config(cfg), api_key=EMULATOR_KEY, emulated=True, install_signals=False).exit_code == 0
    queue = Session(cfg).view().queue
    line = next(ln for ln in queue.lines if ln.decision == "review" and ln.value and ln.processor == "base")
    shots = {}
    with serving(cfg, reviewer="ana") as (server, _):
        tab = Watch(browser, origin(server), 1280, 860)
        tab.page.goto(server.url + "item?" + urlencode({"row": line.row_key, "field": line.field}))
        assert "lite-fast" in tab.page.inner_text("#others")
        shots["review.png"] = tmp_path / "review.png"
        tab.page.screenshot(path=str(shots["review.png"]))
        tab.page.goto(server.url)
        shots["review-queue.png"] = tmp_path / "review-queue.png"
        tab.page.screenshot(path=str(shots["review-queue.png"]))
        tab.quiet()
    for name, shot in shots.items():
        assert shot.stat().st_size > 20_000, name
        if os.environ.get("ENRICH_UPDATE_SCREENSHOT"):
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / name)
