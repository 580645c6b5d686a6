"""Jobs and page helpers for the review page's tests: rows researched by the emulator from a knowledge table
(hostile content included), the page read with html.parser, forms submitted as a browser submits them."""

from __future__ import annotations

import contextlib
import csv
import html
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx

from enrich.config import load_config
from enrich.job import EXIT_OK, run_job
from enrich.preflight import EMULATOR_KEY
from enrich.review_page.server import ReviewServer
from enrich.review_page.session import Session
from tests.conftest import write_config

FIELDS = {"headquarters_location": "string", "founded_year": "integer", "industry": "string"}
ESCALATE = '[escalate]\nprocessors = ["base"]\non = ["rejected"]\n'

# Researched content is hostile: each of these must show as inert text (never run, never a link).
HOSTILE_ROWS = [
    {
        "company": "Acme <script>window.__pwned=1;alert(1)</script>",
        "website": "javascript:window.__pwned=8;alert(8)",
        "headquarters_location": '<img src=x onerror="window.__pwned=2;alert(2)">',
        "founded_year": "1999",
        "industry": '"><svg onload=alert(3)>',
        "source_url": "javascript:window.__pwned=4;alert(4)//",
    },
    {
        "company": "Globex",
        "website": "globex.example",
        "headquarters_location": "Springfield <b onmouseover=alert(5)>x</b>",
        "founded_year": "1989",
        "industry": "Nuclear <iframe src=https://evil.example/></iframe>",
        "source_url": "data:text/html,<script>alert(6)</script>",
    },
    {
        "company": "Initech",
        "website": "initech.example",
        "headquarters_location": "Austin, Texas",
        "founded_year": "1998",
        "industry": "Software",
        "source_url": 'https://initech.example/about"onmouseover="alert(7)',
    },
]
HOSTILE_MARKERS = ("<script>", "<img", "<svg", "<b onmouseover", "<iframe", 'about"onmouseover')


def make_job(
    tmp_path: Path,
    rows: list[dict[str, str]],
    *,
    tier: str = "core",
    fields: dict[str, str] | None = None,
    extra: str = ESCALATE,
    emulator: str = "time_scale = 0",
    research: bool = True,
) -> Path:
    """A job whose input is `rows`' company and website, researched (lite-fast, then base) from a knowledge
    table of `rows` in which every field needs `tier` (so answers come back medium or low: review lines)."""
    fields = fields or FIELDS
    knowledge = tmp_path / "knowledge.csv"
    columns = ["company", *fields, *(f"{f}__tier" for f in fields), "source_url"]
    with knowledge.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, **{f"{f}__tier": tier for f in fields}} for r in rows)
    src = tmp_path / "input.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["company", "website"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.parquet",
        key=["company"],
        columns=["company", "website"],
        fields=fields,
        limits="max_in_flight = 2000\nrequests_per_minute = 100000",
        emulator=f"knowledge = {str(knowledge)!r}\nknowledge_key = 'company'\nrate_limit = 0\n{emulator}",
    )
    cfg.write_text(cfg.read_text() + "\n" + extra)
    if research:
        result = run_job(load_config(cfg), api_key=EMULATOR_KEY, emulated=True, install_signals=False)
        assert result.exit_code == EXIT_OK, result.message
    return cfg


@contextlib.contextmanager
def serving(cfg: Path, reviewer: str = "ana") -> Iterator[tuple[ReviewServer, httpx.Client]]:
    """The review page of a job on loopback (port 0), and an HTTP client for it."""
    with ReviewServer(Session(cfg, reviewer=reviewer)) as server, httpx.Client(timeout=60) as client:
        yield server, client


def origin(server: ReviewServer) -> str:
    return f"http://127.0.0.1:{server.port}"


class Page(HTMLParser):
    """What a served page holds: every element's attributes, scripts, links, forms (fields and buttons), text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.forms: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._in: str | None = None
        self._form: dict[str, Any] | None = None
        self._textarea: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "script":
            self.scripts.append((a, ""))
            self._in = "script"
        elif tag == "form":
            self._form = {"action": a.get("action"), "method": a.get("method"), "fields": {}, "buttons": {}}
            self.forms.append(self._form)
        elif self._form is not None and tag == "input" and a.get("name"):
            self._form["fields"][a["name"]] = a.get("value") or ""
        elif self._form is not None and tag == "textarea" and a.get("name"):
            self._textarea = a["name"]
            self._form["fields"][a["name"]] = ""
        elif self._form is not None and tag == "button" and a.get("id"):
            self._form["buttons"][a["id"]] = (a.get("name"), a.get("value"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in = None
        elif tag == "form":
            self._form = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        if self._textarea is not None and self._form is not None:
            # a browser drops the newline that follows <textarea>
            self._form["fields"][self._textarea] += data if self._form["fields"][self._textarea] else data.lstrip("\n")
        self.text.append(data)

    def links(self) -> list[dict[str, str | None]]:
        return [a for tag, a in self.elements if tag == "a" and "href" in a]

    def form(self, action_end: str) -> dict[str, Any]:
        return next(f for f in self.forms if (f["action"] or "").endswith(action_end))

    def by_id(self, ident: str) -> dict[str, str | None]:
        return next(a for _, a in self.elements if a.get("id") == ident)


def submit(
    client: httpx.Client, server: ReviewServer, form: dict[str, Any], button: str | None = None, **fields: str
) -> httpx.Response:
    """Submit a parsed form as a browser does: its fields, the pressed button's name=value, edits on top."""
    data = dict(form["fields"])
    if button is not None:
        name, value = form["buttons"][button]
        data[name] = value
    data.update(fields)
    return client.post(origin(server) + form["action"], data=data, headers={"origin": origin(server)})


def open_item(client: httpx.Client, server: ReviewServer, text: str) -> tuple[httpx.Response, Page]:
    """Follow the first link of a queue page (`text`, its HTML) to an item page."""
    href = Page(text).by_id("open")["href"]
    assert href is not None
    r = client.get(origin(server) + href)
    return r, Page(r.text)


def counters(text: str) -> tuple[int, int]:
    """(done, left) as the page's header shows them."""
    done = re.search(r'id="done">([\d,]+)<', text)
    left = re.search(r'id="left">([\d,]+)<', text)
    assert done and left, text[:500]
    return int(done.group(1).replace(",", "")), int(left.group(1).replace(",", ""))


def unescaped(text: str) -> str:
    return html.unescape(text)
