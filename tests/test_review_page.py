"""`enrich review serve`: the review page over loopback HTTP, against jobs the emulator researched (hostile content
included): the queue is the review file's lines, verdicts take review apply's path, and the page is locked down."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich.errors import InputError
from enrich.files import review_path
from enrich.job import apply_review, open_job
from enrich.journal import Journal
from enrich.review_page.app import CSP, LOCKED
from enrich.review_page.queue import build_queue, safe_href
from enrich.review_page.server import is_loopback
from enrich.review_page.session import Session
from tests.conftest import ROOT, run_enrich, wait_for
from tests.review_helpers import (
    HOSTILE_MARKERS,
    HOSTILE_ROWS,
    Page,
    counters,
    make_job,
    open_item,
    origin,
    serving,
    submit,
)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A job of the hostile rows, for one test that records verdicts."""
    return make_job(tmp_path, HOSTILE_ROWS)


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of the hostile rows shared by the tests that only look (each checks that nothing was recorded)."""
    return make_job(tmp_path_factory.mktemp("shown"), HOSTILE_ROWS)


def verdicts(cfg: Path) -> list[tuple[Any, ...]]:
    """Every verdict in the job's journal: (row_key, field, verdict, corrected_json, reviewer, note, run_id)."""
    journal = Journal.open(cfg.parent / "out.parquet.journal.sqlite", readonly=True)
    try:
        return journal.conn.execute(
            "SELECT row_key, field, verdict, corrected_json, reviewer, note, run_id FROM verdicts ORDER BY id"
        ).fetchall()
    finally:
        journal.close()


def csv_lines(cfg: Path) -> list[dict[str, str]]:
    with review_path(cfg.parent / "out.parquet").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def queue_lines(cfg: Path) -> list[tuple[str, ...]]:
    job, journal, _ = open_job(cfg, readonly=True)
    try:
        q = build_queue(job, journal)
    finally:
        journal.close()
    return [(*ln.key, ln.field, ln.value, ln.confidence, ln.processor, ln.run_id) for ln in q.lines if not ln.done]


def as_csv(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
    return [(r["company"], r["field"], r["value"], r["confidence"], r["processor"], r["run_id"]) for r in rows]


def test_the_queue_is_the_review_files_lines(shown: Path) -> None:
    """The page's queue holds exactly the review file's lines, least confident first, and counts them."""
    lines = queue_lines(shown)
    assert len(lines) >= 6 and sorted(lines) == sorted(as_csv(csv_lines(shown)))
    with serving(shown) as (server, client):
        r = client.get(server.url)
    assert r.status_code == 200 and counters(r.text) == (0, len(lines))
    ranks = {"none": 0, "low": 1, "medium": 2, "high": 3}
    assert [ranks[ln[3]] for ln in lines] == sorted(ranks[ln[3]] for ln in lines)


def test_every_request_needs_the_token(shown: Path) -> None:
    """Without the URL's token, with a wrong or partial one, or under another Host name, every path is refused."""
    with serving(shown) as (server, client):
        base = origin(server)
        assert client.get(server.url).status_code == 200
        for path in ("/", "/static/review.js", "/item", f"/{server.token[:-1]}/", f"/{server.token}x/", "/x/verdict"):
            r = client.get(base + path)
            assert r.status_code == 403, path
            assert "token" in r.text and server.token not in r.text
        assert client.post(base + "/verdict", data={"verdict": "accept"}).status_code == 403
        rebound = client.get(server.url, headers={"host": f"evil.example:{server.port}"})
        assert rebound.status_code == 403 and "Host" in rebound.text
        assert client.get(f"http://localhost:{server.port}/{server.token}/").status_code == 200
    assert verdicts(shown) == []


def test_changes_are_posts_with_the_pages_csrf_token(hostile: Path) -> None:
    """A verdict by GET, without or with a wrong CSRF token, or from another origin is refused; nothing is recorded."""
    with serving(hostile) as (server, client):
        _, page = open_item(client, server, client.get(server.url).text)
        form = page.form("/verdict")
        assert client.get(server.url + "verdict", params=form["fields"]).status_code == 405
        assert submit(client, server, form, "btn-accept", csrf="").status_code == 403
        assert submit(client, server, form, "btn-accept", csrf=form["fields"]["csrf"][:-2] + "xx").status_code == 403
        cross = client.post(
            origin(server) + form["action"], data={**form["fields"], "verdict": "accept"}, headers={"origin": "null"}
        )
        assert cross.status_code == 403
        as_json = client.post(origin(server) + form["action"], json={**form["fields"], "verdict": "accept"})
        assert as_json.status_code == 415
        assert verdicts(hostile) == []
        assert submit(client, server, form, "btn-accept").status_code == 303  # the page's own form works
    assert len(verdicts(hostile)) == 1


def test_headers_forbid_inline_scripts_frames_and_remote_loads(shown: Path) -> None:
    """Every response carries the CSP (scripts and styles only from the server, no frames), referrers only to itself."""
    with serving(shown) as (server, client):
        queue = client.get(server.url)
        _, item = open_item(client, server, queue.text)
        for r in (queue, client.get(server.url + "static/review.js"), client.get(origin(server) + "/")):
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["referrer-policy"] == "same-origin" and r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP and "default-src 'none'" in CSP
    assert "unsafe-inline" not in CSP
    for page in (Page(queue.text), item):
        assert [(a.get("src"), body.strip()) for a, body in page.scripts] == [(f"/{server.token}/static/review.js", "")]
        assert not [(tag, k) for tag, a in page.elements for k in a if k.startswith("on") or k == "style"]


def test_hostile_content_is_inert_in_the_served_html(shown: Path) -> None:
    """Scripts, event attributes, javascript: and data: URLs from the research show as text on every item page;
    only http(s) URLs are links, opening a new tab with rel=noopener noreferrer."""
    seen_text = ""
    with serving(shown) as (server, client):
        queue = Session(shown).view().queue
        for line in queue.lines:
            r = client.get(server.url + "item", params={"row": line.row_key, "field": line.field})
            assert r.status_code == 200
            for marker in HOSTILE_MARKERS:
                assert marker not in r.text  # never raw HTML ...
            page = Page(r.text)
            seen_text += "".join(page.text)  # ... but the text, unescaped by the parser, is all there
            assert not [(tag, k) for tag, a in page.elements for k in a if k.startswith("on")]
            assert {tag for tag, _ in page.elements}.isdisjoint({"img", "svg", "iframe"})
            for a in page.links():
                href = a["href"] or ""
                if href.startswith("/"):
                    assert href.startswith(f"/{server.token}/")
                    continue
                assert href.startswith(("https://", "http://")), href
                assert a.get("target") == "_blank" and a.get("rel") == "noopener noreferrer"
    for row in HOSTILE_ROWS:
        assert row["company"] in seen_text and row["website"] in seen_text
    assert "javascript:window.__pwned=4;alert(4)//" in seen_text  # a citation URL that is not a link
    assert "data:text/html,<script>alert(6)</script>" in seen_text
    assert HOSTILE_ROWS[0]["headquarters_location"] in seen_text and HOSTILE_ROWS[1]["industry"] in seen_text


@pytest.mark.parametrize(
    "url,link",
    [
        ("https://example.com/a?b=1#c", True),
        ("http://example.com", True),
        ("HTTPS://EXAMPLE.COM/", True),
        ("javascript:alert(1)", False),
        ("JavaScript:alert(1)", False),
        (" javascript:alert(1)", False),
        ("java\tscript:alert(1)", False),
        ("data:text/html,<script>alert(1)</script>", False),
        ("vbscript:msgbox(1)", False),
        ("//evil.example/x", False),
        ("/relative", False),
        ("https://", False),
        ("https://exa mple.com", False),
        ("https://example.com/\n", False),
        ("http://[::1", False),
    ],
)
def test_only_absolute_http_urls_become_links(url: str, link: bool) -> None:
    """safe_href lets through absolute http(s) URLs with a host, and nothing else."""
    assert (safe_href(url) == url) is link


def test_an_item_shows_its_evidence_and_the_weaker_processors_answer(shown: Path) -> None:
    """An item shows the row's input, the kept answer with its reasoning and citations, and lite-fast's answer."""
    with serving(shown) as (server, client):
        q = Session(shown).view().queue
        line = next(ln for ln in q.lines if ln.key[0] == "Initech" and ln.processor == "base")
        r = client.get(server.url + "item", params={"row": line.row_key, "field": line.field})
    page = Page(r.text)
    text = "".join(page.text)
    assert "initech.example" in text and line.value in text and "base" in text
    assert "The knowledge-table row" in text or "Hard to establish" in text
    others = r.text[r.text.index('id="others"') :]
    assert "lite-fast" in others  # the weaker processor's answer for the same field
    assert "(emulator knowledge table)" in text  # a citation's title
    links = [a for a in page.links() if (a["href"] or "").startswith("https://initech.example/")]
    assert links and links[0]["href"] == 'https://initech.example/about"onmouseover="alert(7)'


def test_a_bad_correction_is_refused_as_review_apply_refuses_it(hostile: Path, tmp_path: Path) -> None:
    """A correction that does not fit the field's type, or an accept of an edited value, is refused with review
    apply's own reason; nothing is recorded."""
    q = Session(hostile).view().queue
    line = next(ln for ln in q.lines if ln.field == "founded_year")
    with serving(hostile) as (server, client):
        r = client.get(server.url + "item", params={"row": line.row_key, "field": line.field})
        form = Page(r.text).form("/verdict")
        bad = submit(client, server, form, "btn-correct", corrected_value="nineteen ninety")
        edited = submit(client, server, form, "btn-accept", value="2001")
    assert bad.status_code == 400 and edited.status_code == 400
    assert verdicts(hostile) == []
    # the same two lines through the review file
    rows = [r for r in csv_lines(hostile) if (r["company"], r["field"]) == (line.key[0], line.field)]
    job, journal, _ = open_job(hostile)
    try:
        reasons = []
        for edit in (
            {"verdict": "correct", "corrected_value": "nineteen ninety"},
            {"verdict": "accept", "value": "2001"},
        ):
            path = tmp_path / "one.csv"
            with path.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerow({**rows[0], **edit})
            with pytest.raises(InputError) as info:
                apply_review(job, journal, path)
            reasons.append(info.value.reason)
    finally:
        journal.close()
    assert "corrected_value 'nineteen ninety' is not an integer" in reasons[0]
    assert "was edited but the verdict is accept" in reasons[1]
    for reason, page in zip(reasons, (bad, edited), strict=True):
        assert Page(page.text).by_id("error") is not None
        assert f"not recorded: {reason}" in "".join(Page(page.text).text)


def test_a_verdict_form_sent_without_a_verdict_says_nothing_was_recorded(hostile: Path) -> None:
    """The item's form sent with no button's verdict: 400 and the page says not recorded (no 'done' flash)."""
    with serving(hostile) as (server, client):
        _, page = open_item(client, server, client.get(server.url).text)
        sent = submit(client, server, page.form("/verdict"))
        assert sent.status_code == 400 and "not recorded" in "".join(Page(sent.text).text)
        assert counters(client.get(server.url).text)[0] == 0
    assert verdicts(hostile) == []


def test_accept_correct_reject_then_write_output(hostile: Path) -> None:
    """Three verdicts from the page land in the journal (who, note, run reviewed); `write output` rewrites the
    output with human_* decisions and the review file without those lines."""
    before = csv_lines(hostile)
    done: list[tuple[str, str, str]] = []  # (company, field, corrected value)
    with serving(hostile, reviewer="bo") as (server, client):
        _, page = open_item(client, server, client.get(server.url).text)
        for verdict in ("accept", "correct", "reject"):
            form = page.form("/verdict")
            field = form["fields"]["field"]
            value = "1901" if field == "founded_year" else "Corrected, on the page"
            sent = submit(client, server, form, f"btn-{verdict}", corrected_value=value, note=f"{verdict} note")
            assert sent.status_code == 303, sent.text[:2000]
            done.append((json.loads(form["fields"]["row"])[0], field, value))
            r = client.get(origin(server) + sent.headers["location"])
            assert r.status_code == 200 and verdict[:-1] in "".join(Page(r.text).text)  # "accepted ...", ...
            page = Page(r.text)
        assert counters(client.get(server.url).text) == (3, len(before) - 3)
        wrote = submit(client, server, Page(client.get(server.url).text).form("/write"))
        assert wrote.status_code == 303
        assert "wrote " in client.get(origin(server) + wrote.headers["location"]).text
    stored = verdicts(hostile)
    assert [(json.loads(v[0])[0], v[1], v[2]) for v in stored] == [
        (c, f, v) for (c, f, _), v in zip(done, ["accept", "correct", "reject"], strict=True)
    ]
    assert {v[4] for v in stored} == {"bo"} and [v[5] for v in stored] == ["accept note", "correct note", "reject note"]
    assert stored[0][6] and stored[2][6]  # the run reviewed
    typed = 1901 if done[1][1] == "founded_year" else done[1][2]
    assert stored[0][3] is None and json.loads(stored[1][3]) == typed and stored[2][3] is None
    out = pl.read_parquet(hostile.parent / "out.parquet")
    at = {c: i for i, c in enumerate(out["company"].to_list())}
    assert [out[f"{f}__decision"][at[c]] for c, f, _ in done] == ["human_accepted", "human_corrected", "human_rejected"]
    assert out[done[1][1]][at[done[1][0]]] == typed
    assert out[done[2][1]][at[done[2][0]]] is None  # a rejected value is blanked
    after = csv_lines(hostile)
    assert len(after) == len(before) - 3 and sorted(as_csv(after)) == sorted(queue_lines(hostile))


def test_incremental_queue_matches_a_fresh_projection(hostile: Path) -> None:
    """After verdicts the page's refreshed queue equals the queue projected from scratch."""
    session = Session(hostile, reviewer="ana")
    with serving(hostile) as (server, client):
        server.app.session = session  # this test's own session, to look at its queue afterwards
        r = client.get(server.url)
        for button in ("btn-accept", "btn-reject"):
            r, page = open_item(client, server, r.text)
            assert submit(client, server, page.form("/verdict"), button).status_code == 303
            r = client.get(server.url)
    kept = session._queue
    job, journal, _ = open_job(hostile, readonly=True)
    try:
        fresh = build_queue(job, journal)
    finally:
        journal.close()
    assert kept is not None and kept.state == fresh.state
    assert kept.lines == fresh.lines and kept.done == 2


def test_two_tabs_submit_at_once_and_no_verdict_is_lost(hostile: Path) -> None:
    """Verdicts POSTed from several tabs at the same moment (also twice on one line) are all recorded."""
    with serving(hostile) as (server, client):
        lines = Session(hostile).view().queue.lines
        forms = []
        for line in lines:
            r = client.get(server.url + "item", params={"row": line.row_key, "field": line.field})
            forms.append(Page(r.text).form("/verdict"))
        forms.append(forms[0])  # the same line from a second tab
        start = threading.Barrier(len(forms))
        codes: list[int] = []

        def tab(form: dict[str, Any]) -> None:
            with httpx.Client(timeout=60) as own:
                start.wait()
                codes.append(submit(own, server, form, "btn-accept").status_code)

        threads = [threading.Thread(target=tab, args=(f,)) for f in forms]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        done, left = counters(client.get(server.url).text)
    assert codes == [303] * len(forms)
    stored = verdicts(hostile)
    assert len(stored) == len(forms) and {(v[0], v[1]) for v in stored} == {ln.ident for ln in lines}
    assert (done, left) == (len(lines), 0)


def test_bulk_accept_asks_first_and_accepts_the_filtered_lines(hostile: Path) -> None:
    """Accept-all shows a confirmation and records nothing; confirmed, it accepts the filter's lines only; a
    confirmation for a queue that changed since is refused."""
    lines = Session(hostile).view().queue.lines
    field = "industry"
    wanted = {ln.ident for ln in lines if ln.field == field}
    with serving(hostile) as (server, client):
        queue = client.get(server.url, params={"f_field": field})
        ask = submit(client, server, Page(queue.text).form("/bulk"))
        assert ask.status_code == 200 and f"Accept {len(wanted)} lines?" in ask.text
        assert verdicts(hostile) == []
        confirm = Page(ask.text).form("/bulk")
        # another tab records a verdict in between: this confirmation is for a queue that is gone
        other = next(ln for ln in lines if ln.field != field)
        item = client.get(server.url + "item", params={"row": other.row_key, "field": other.field})
        assert submit(client, server, Page(item.text).form("/verdict"), "btn-reject").status_code == 303
        stale = submit(client, server, confirm)
        assert stale.status_code == 409 and "changed" in stale.text
        assert len(verdicts(hostile)) == 1
        again = submit(client, server, Page(stale.text).form("/bulk"))
        assert again.status_code == 303
    stored = verdicts(hostile)
    assert {(v[0], v[1]) for v in stored[1:]} == wanted and {v[2] for v in stored[1:]} == {"accept"}


def test_verdicts_are_refused_while_a_run_holds_the_journal(tmp_path: Path) -> None:
    """While `enrich run` works on the job the page says so and refuses verdicts (nothing recorded); once the run
    has ended the same verdict is recorded, and the queue shows the rows the run added."""
    cfg = make_job(tmp_path, HOSTILE_ROWS[:2])
    src = tmp_path / "input.csv"
    with src.open("a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["Initech", "initech.example"])  # a new row: the next run researches it
    cfg.write_text(cfg.read_text().replace("time_scale = 0", "time_scale = 0.1"))  # runs of 1-10 s
    with serving(cfg) as (server, client):
        before = counters(client.get(server.url).text)
        item = client.get(server.url + "item", params=_first(cfg))
        form = Page(item.text).form("/verdict")
        run = subprocess.Popen(
            [sys.executable, "-m", "enrich", "run", str(cfg), "--emulator"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: 'id="live"' in client.get(server.url).text, timeout=60, interval=0.2)
            refused = submit(client, server, form, "btn-accept")
            assert refused.status_code == 409 and LOCKED in "".join(Page(refused.text).text)
            assert verdicts(cfg) == []
            _, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 0, err[-1500:]
        page = client.get(server.url).text
        assert 'id="live"' not in page and sum(counters(page)) > sum(before)  # Initech's lines came in
        assert submit(client, server, form, "btn-accept").status_code == 303
    assert len(verdicts(cfg)) == 1


def _first(cfg: Path) -> dict[str, str]:
    line = Session(cfg).view().queue.lines[0]
    return {"row": line.row_key, "field": line.field}


def test_serve_from_the_command_line_prints_the_url_and_writes_the_output_when_stopped(hostile: Path) -> None:
    """`enrich review serve` prints a loopback URL with a token, and Ctrl-C rewrites the output and exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "review", "serve", str(hostile), "--no-browser", "--reviewer", "cy"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and len(url.rstrip("/").rsplit("/", 1)[1]) >= 40
        with httpx.Client(timeout=60) as client:
            queue = client.get(url)
            href = Page(queue.text).by_id("open")["href"]
            base = url.split("/", 3)
            item = client.get(f"{base[0]}//{base[2]}{href}")
            form = Page(item.text).form("/verdict")
            assert form["fields"]["reviewer"] == "cy"
            data = {**form["fields"], "verdict": "accept"}
            posted = client.post(f"{base[0]}//{base[2]}{form['action']}", data=data)
            assert posted.status_code == 303
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped; 1 verdicts recorded; rewrote" in err and "Traceback" not in err
    out = pl.read_parquet(hostile.parent / "out.parquet")
    field = form["fields"]["field"]
    row = out.filter(pl.col("company") == json.loads(form["fields"]["row"])[0])
    assert row[f"{field}__decision"].to_list() == ["human_accepted"]
    assert verdicts(hostile)[0][4] == "cy"


def test_serve_errors_are_one_line(tmp_path: Path, shown: Path) -> None:
    """No journal for the job, or a port that is taken: exit 2 with one line and no traceback."""
    (tmp_path / "new").mkdir()
    cfg = make_job(tmp_path / "new", HOSTILE_ROWS[:1], research=False)
    r = run_enrich("review", "serve", str(cfg), "--no-browser")
    assert r.returncode == 2 and "no journal for this job" in r.stderr and len(r.stderr.splitlines()) == 1
    with serving(shown) as (server, _):
        r = run_enrich("review", "serve", str(shown), "--no-browser", "--port", str(server.port))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and len(r.stderr.splitlines()) == 1


def test_only_loopback_counts_as_this_machine() -> None:
    """The addresses served without a warning are the loopback ones."""
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.com"))


def test_ten_thousand_lines_are_paged(ten_thousand: Path) -> None:
    """10,000 review lines: pages of 50, a last page, filters, an item and a verdict, each page small."""
    with serving(ten_thousand) as (server, client):
        first = client.get(server.url)
        done, left = counters(first.text)
        assert done + left == 10_000
        page = Page(first.text)
        assert len([a for tag, a in page.elements if tag == "tr"]) == 51  # header + 50 lines
        assert len(first.content) < 100_000
        last = client.get(server.url, params={"page": "200"})
        assert 'id="next"' not in last.text and 'id="prev"' in last.text
        n = 200 if left == 10_000 else (left + 49) // 50
        beyond = client.get(server.url, params={"page": "9999"})
        assert f'<span id="page">{n}</span>' in beyond.text
        rejected = client.get(server.url, params={"f_decision": "rejected"})
        matching = int(rejected.text.split('id="matching">')[1].split("<")[0].replace(",", ""))
        assert 0 < matching < 10_000
        r, item = open_item(client, server, first.text)
        assert r.status_code == 200 and "1 of" in r.text
        assert submit(client, server, item.form("/verdict"), "btn-accept").status_code == 303
        assert counters(client.get(server.url).text) == (done + 1, left - 1)
