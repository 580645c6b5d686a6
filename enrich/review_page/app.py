"""The review page's ASGI app: a plain ASGI callable (as the emulator's), Jinja2 templates with autoescape on.

Researched content is hostile, so:

- every request needs the server's random token as the first path segment (`/<token>/...`; 403 without
  it, compared in constant time) and a Host header naming the loopback address it listens on (a DNS
  rebinding page cannot use the server);
- every change is a POST carrying the page's CSRF token (compared in constant time), from the page's own
  origin; GETs change nothing;
- each response forbids inline scripts and styles, frames, plugins and loads from anywhere but the server
  (`Content-Security-Policy`), is never cached and sends a referrer only to the server itself; the page's script and style are
  files served from here;
- every researched string (values, reasoning, titles, excerpts, URLs, input cells) reaches the HTML through
  Jinja2's autoescape; only an absolute http(s) URL becomes a link (`target=_blank`, `rel="noopener
  noreferrer"`); anything else (`javascript:`, `data:`) shows as text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from enrich.errors import EnrichError, InputError, JournalLocked
from enrich.gate import HUMAN_DECISIONS
from enrich.review import TO_REVIEW
from enrich.review_page.queue import PAGE_SIZE, STATUSES, Line, Queue
from enrich.review_page.session import Decision, QueueChanged, Session, View, state_token
from enrich.spec import main_type

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HERE = Path(__file__).resolve().parent
STATIC = {
    "static/review.js": ("text/javascript; charset=utf-8", HERE / "static" / "review.js"),
    "static/review.css": ("text/css; charset=utf-8", HERE / "static" / "review.css"),
    "static/icon.svg": ("image/svg+xml", HERE / "static" / "icon.svg"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # the URL's token is never sent to another site as a referrer; the page's own POSTs keep their Origin
    # (under no-referrer, Chromium sends `Origin: null` and a same-origin form would look foreign)
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
MAX_BODY = 1 << 20
LOCKED = (
    "another enrich process holds the journal (a run, or review apply): verdicts are refused until it ends; "
    "nothing was recorded. Try again when it has finished"
)
VERDICT_WORDS = {"accept": "accepted", "correct": "corrected", "reject": "rejected"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    location: str | None = None

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode()), *SECURITY_HEADERS]
        if self.location is not None:
            headers.append((b"location", self.location.encode()))
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode(), "text/plain; charset=utf-8")


@dataclass(frozen=True)
class Filters:
    """The queue's filter and page, from a query string or a form (unknown values mean "any")."""

    field: str = ""
    decision: str = ""
    processor: str = ""
    status: str = "left"
    page: int = 1

    @classmethod
    def of(cls, params: Mapping[str, str], queue: Queue) -> Filters:
        page = params.get("page", "1")
        return cls(
            field=params.get("f_field", "") if params.get("f_field", "") in queue.fields else "",
            decision=d if (d := params.get("f_decision", "")) in (*TO_REVIEW, *HUMAN_DECISIONS) else "",
            processor=params.get("f_processor", "")[:100],
            status=s if (s := params.get("f_status", "left")) in STATUSES else "left",
            page=int(page) if page.isdigit() and 0 < int(page) < 10**9 else 1,
        )

    def params(self, page: bool = True) -> dict[str, str]:
        out = {"f_field": self.field, "f_decision": self.decision, "f_processor": self.processor}
        out = {k: v for k, v in out.items() if v}
        if self.status != "left":
            out["f_status"] = self.status
        if page and self.page != 1:
            out["page"] = str(self.page)
        return out

    def select(self, queue: Queue) -> list[Line]:
        return queue.select(self.field, self.decision, self.processor, self.status)


def _environment() -> Any:
    import jinja2  # loaded only by `enrich review serve`

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name: researched strings are hostile
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class App:
    """The review page over one Session. `hosts`: the Host headers accepted (None: any, for --host)."""

    def __init__(self, session: Session, token: str, hosts: set[str] | None):
        self.session, self.token, self.hosts = session, token, hosts
        self.csrf = secrets.token_urlsafe(32)
        self.base = f"/{token}/"
        self.env = _environment()
        self.flashes: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            response = await self.handle(scope, receive)
        except Exception as exc:  # a bug: one line on the terminal, a plain page in the browser
            print(f"enrich: review page: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            response = _text(500, "internal error; see the terminal running `enrich review serve`")
        await response.send(send)

    # ---- the gate every request passes --------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive) -> Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and host not in self.hosts:
            return _text(403, "forbidden: unexpected Host header")
        _, _, path = scope["path"].partition("/")
        token, slash, rest = path.partition("/")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return _text(403, "forbidden: open the URL that `enrich review serve` printed (it holds the token)")
        if not slash:
            return Response(303, location=self.base)
        method = scope["method"]
        if rest in STATIC or rest in ("", "item"):
            if method not in ("GET", "HEAD"):
                return _text(405, "method not allowed")
            query = _form(scope.get("query_string", b""))
            if rest in STATIC:
                kind, file = STATIC[rest]
                return Response(200, file.read_bytes(), kind)
            if rest == "":
                return await asyncio.to_thread(self.queue_page, query)
            return await asyncio.to_thread(self.item_page, query)
        if rest not in ("verdict", "bulk", "write"):
            return _text(404, "not found")
        if method != "POST":
            return _text(405, "method not allowed: changes are POSTs from the page")
        origin = headers.get("origin")
        if (origin is not None and origin != f"http://{host}") or headers.get("sec-fetch-site") == "cross-site":
            return _text(403, "forbidden: a change must come from the review page itself")
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return _text(415, "unsupported media type: send the page's form")
        body = await _body(receive)
        if body is None:
            return _text(413, "request too large")
        form = _form(body)
        if not hmac.compare_digest(form.get("csrf", "").encode(), self.csrf.encode()):
            return _text(403, "forbidden: missing or wrong CSRF token; reload the page")
        handler = {"verdict": self.post_verdict, "bulk": self.post_bulk, "write": self.post_write}[rest]
        return await asyncio.to_thread(handler, form)

    # ---- pages ----------------------------------------------------------------------------------------------
    def render(self, name: str, status: int = 200, **context: Any) -> Response:
        html = self.env.get_template(name).render(
            base=self.base,
            csrf=self.csrf,
            queue_url=self.queue_url,
            item_url=self.item_url,
            fmt_time=_fmt_time,
            shown_path=_shown_path,
            **context,
        )
        return Response(status, html.encode())

    def url(self, page: str, params: Mapping[str, str] | None = None) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v != ""})
        return self.base + page + (f"?{query}" if query else "")

    def queue_url(self, filters: Filters, page: int | None = None) -> str:
        return self.url("", {**filters.params(page=False), **({"page": str(page)} if page and page > 1 else {})})

    def item_url(self, line: Line, filters: Filters) -> str:
        return self.url("item", {"row": line.row_key, "field": line.field, **filters.params(page=False)})

    def _common(self, view: View, filters: Filters, flash: str = "") -> dict[str, Any]:
        queue = view.queue
        return {
            "job": view.job,
            "live": view.live,
            "queue": queue,
            "filters": filters,
            "flash": flash,
            "reviewer": self.session.reviewer,
            "fields": queue.fields,
            "decisions": queue.decisions(),
            "processors": queue.processors(),
            "statuses": STATUSES,
        }

    def _flash(self, params: Mapping[str, str]) -> str:
        return self.flashes.pop(params.get("flash", ""), "")

    def _say(self, text: str) -> str:
        key = secrets.token_urlsafe(8)
        self.flashes[key] = text
        while len(self.flashes) > 200:  # a tab that never came back for its message
            self.flashes.pop(next(iter(self.flashes)))
        return key

    def queue_page(self, params: Mapping[str, str], flash: str = "", status: int = 200) -> Response:
        view = self.session.view()
        filters = Filters.of(params, view.queue)
        selected = filters.select(view.queue)
        pages = max(1, math.ceil(len(selected) / PAGE_SIZE))
        filters = replace(filters, page=min(filters.page, pages))
        start = (filters.page - 1) * PAGE_SIZE
        return self.render(
            "queue.html",
            status,
            **self._common(view, filters, flash or self._flash(params)),
            selected=selected,
            shown=selected[start : start + PAGE_SIZE],
            first=start + 1,
            pages=pages,
        )

    def item_page(
        self,
        params: Mapping[str, str],
        error: str = "",
        status: int = 200,
        typed: Mapping[str, str] | None = None,
    ) -> Response:
        view, found = self.session.item(params.get("row", ""), params.get("field", ""))
        filters = Filters.of(params, view.queue)
        if found is None:
            return self.queue_page(filters.params(), flash="that line is not in this job (any more)", status=404)
        selected = filters.select(view.queue)
        prev_line, next_line = _neighbours(selected, found.line)
        return self.render(
            "item.html",
            status,
            **self._common(view, filters, self._flash(params)),
            item=found,
            line=found.line,
            error=error,
            typed=typed or {},
            prev_line=prev_line,
            next_line=next_line,
            position=_position(selected, found.line),
            total=len(selected),
            kind=main_type(dict(view.job.fields.get(found.line.field) or {})),
        )

    # ---- changes --------------------------------------------------------------------------------------------
    def post_verdict(self, form: Mapping[str, str]) -> Response:
        verdict = form.get("verdict", "")
        decision = Decision(
            row_key=form.get("row", ""),
            field=form.get("field", ""),
            verdict=verdict,
            corrected_value=form.get("corrected_value", "").replace("\r\n", "\n") if verdict == "correct" else "",
            note=form.get("note", "").replace("\r\n", "\n"),
            run_id=form.get("run_id", ""),
            value=form.get("value"),
        )
        reviewer = form.get("reviewer", self.session.reviewer).strip()
        typed = {"corrected_value": form.get("corrected_value", ""), "note": form.get("note", "")}
        if not verdict.strip():  # a blank verdict is a line not yet reviewed: it records nothing, so say so
            return self.item_page(form, error="not recorded: press accept, correct or reject", status=400, typed=typed)
        try:
            self.session.decide([decision], reviewer)
        except JournalLocked:
            return self.item_page(form, error=LOCKED, status=409, typed=typed)
        except InputError as exc:
            return self.item_page(form, error=f"not recorded: {exc.reason}", status=400, typed=typed)
        except EnrichError as exc:
            return self.item_page(form, error=f"not recorded: {exc}", status=409, typed=typed)
        view = self.session.view()
        filters = Filters.of(form, view.queue)
        word = VERDICT_WORDS.get(verdict.strip().casefold(), verdict)
        said = f"{word} {decision.field} of {', '.join(_key_cells(decision.row_key))}"
        after = _after(filters.select(view.queue), decision.row_key, decision.field, view.queue)
        if after is None:
            flash = self._say(said + "; no more lines in this filter")
            return Response(303, location=self.url("", {**filters.params(page=False), "flash": flash}))
        params = {"row": after.row_key, "field": after.field, **filters.params(page=False), "flash": self._say(said)}
        return Response(303, location=self.url("item", params))

    def post_bulk(self, form: Mapping[str, str]) -> Response:
        view = self.session.view()
        filters = replace(Filters.of(form, view.queue), status="left", page=1)
        lines = filters.select(view.queue)
        token = state_token(view.queue)
        if not lines:
            return self.queue_page(filters.params(), flash="nothing left to accept in this filter")
        if form.get("confirm") != "yes":
            return self.render("confirm.html", **self._common(view, filters), lines=lines, state=token, changed=False)
        if form.get("state") != token or form.get("count") != str(len(lines)):
            return self.render(
                "confirm.html", 409, **self._common(view, filters), lines=lines, state=token, changed=True
            )
        try:
            n = self.session.accept_all(lines, token, form.get("reviewer", self.session.reviewer).strip())
        except QueueChanged:
            view = self.session.view()
            lines = filters.select(view.queue)
            return self.render(
                "confirm.html",
                409,
                **self._common(view, filters),
                lines=lines,
                state=state_token(view.queue),
                changed=True,
            )
        except JournalLocked:
            return self.queue_page(filters.params(), flash=LOCKED, status=409)
        except EnrichError as exc:
            reason = exc.reason if isinstance(exc, InputError) else str(exc)
            return self.queue_page(filters.params(), flash=f"nothing recorded: {reason}", status=409)
        flash = self._say(f"accepted {n:,} lines")
        return Response(303, location=self.url("", {**filters.params(page=False), "flash": flash}))

    def post_write(self, form: Mapping[str, str]) -> Response:
        view = self.session.view()
        filters = Filters.of(form, view.queue)
        try:
            report = self.session.write()
        except JournalLocked:
            return self.queue_page(filters.params(), flash=LOCKED.replace("verdicts are", "writing is"), status=409)
        except EnrichError as exc:
            return self.queue_page(filters.params(), flash=f"not written: {exc}", status=409)
        said = f"wrote {report['output']} ({report['rows']:,} rows)"
        if report.get("review_file"):
            said += f"; {report['review_lines']:,} lines left in {report['review_file']}"
        return Response(303, location=self.url("", {**filters.params(), "flash": self._say(said)}))


def _neighbours(selected: list[Line], line: Line) -> tuple[Line | None, Line | None]:
    """The lines before and after `line` in a filtered queue (by queue order, also when it is not in it)."""
    before = [ln for ln in selected if ln.order < line.order and ln.ident != line.ident]
    after = [ln for ln in selected if ln.order > line.order and ln.ident != line.ident]
    return (before[-1] if before else None), (after[0] if after else None)


def _position(selected: list[Line], line: Line) -> int | None:
    return next((i + 1 for i, ln in enumerate(selected) if ln.ident == line.ident), None)


def _after(selected: list[Line], row_key: str, field: str, queue: Queue) -> Line | None:
    """Where to go after a verdict: the next line of the filter after this one, else its first other line."""
    this = next((ln for ln in queue.lines if ln.ident == (row_key, field)), None)
    others = [ln for ln in selected if ln.ident != (row_key, field)]
    if this is not None:
        later = [ln for ln in others if ln.order > this.order]
        if later:
            return later[0]
    return others[0] if others else None


def _key_cells(row_key: str) -> list[str]:
    try:
        values = json.loads(row_key)
    except ValueError:
        return [row_key]
    return [str(v) for v in values] if isinstance(values, list) else [row_key]


def _shown_path(path: Path) -> str:
    """A path as the reviewer typed it: relative to the current directory when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _fmt_time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _form(data: bytes) -> dict[str, str]:
    """The first value of each field of a urlencoded query or form (UTF-8; undecodable bytes replaced)."""
    parsed = parse_qs(data.decode("ascii", "replace"), keep_blank_values=True, encoding="utf-8", errors="replace")
    return {k: v[0] for k, v in parsed.items()}


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
