"""The HTML run report: one self-contained page drawn from the JSON report alone.

Why from the JSON report only: every number on the page is then, by construction, the
number in `<output>.report.json` (each is printed with `data-key`/`data-value` attributes
holding the JSON value, which the tests compare). Charts are static SVG drawn by charts.py:
no JavaScript, no CDN, nothing fetched when the page opens.

Everything that came from the web (confidence labels, decision values, domains, error
text) is hostile: text goes through `html.escape`, chart labels are reduced to printable
characters before they reach the chart (charts.py escapes SVG text again), and the page
carries a Content-Security-Policy that forbids every script, so even a missed escape cannot run.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from enrich.charts import hbars, vbars

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STATUS_COLOURS = {
    "completed": "#2e7d32",
    "failed": "#c62828",
    "timed_out": "#ef6c00",
    "unknown": "#6d4c41",
    "pending": "#9e9e9e",
    "skipped_budget": "#5e35b1",
}
CONF_COLOURS = {"high": "#2e7d32", "medium": "#f9a825", "low": "#c62828", "None": "#bdbdbd"}
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f<>&\"'`=\u200e\u200f\u202a-\u202e\u2066-\u2069]")  # bidi controls too

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:20px 28px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 14px}.emulated{background:#b71c1c;color:#fff;font-weight:700;font-size:18px;
padding:12px 16px;border-radius:6px;margin:10px 0 16px;letter-spacing:.02em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:18px;align-items:start}
.card{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:12px 14px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}td.n{text-align:right}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:6px 0 4px}.kpi{background:#fff;border:1px solid #e3e3e3;
border-radius:8px;padding:8px 14px;min-width:120px}.kpi b{display:block;font-size:20px}.kpi span{color:#666;font-size:12px}
figure.chart{margin:0}figure.chart svg{max-width:100%;height:auto}.note{color:#666;font-size:12px}
"""


def esc(value: Any) -> str:
    """HTML-escape any value (quotes too): `esc('<b a="x">')` -> '&lt;b a=&quot;x&quot;&gt;'."""
    return html.escape("" if value is None else str(value), quote=True)


def label(value: Any, limit: int = 48) -> str:
    """A chart label: printable characters only (no markup or `=`), bounded: `label("<script>x")` -> "scriptx"."""
    text = _UNPRINTABLE.sub("", str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def num(key: str, value: Any, unit: str = "") -> str:
    """A figure from the JSON report, tagged with its key and exact JSON value for checking."""
    shown = "–" if value is None else (f"${value}" if unit == "$" else f"{json.dumps(value)}{unit}")
    return f'<span data-key="{esc(key)}" data-value="{esc(json.dumps(value))}">{esc(shown)}</span>'


def _figure(chart_id: str, title: str, svg: str | None, table: str = "", note: str = "") -> str:
    body = (
        f'<figure class="chart" id="chart-{chart_id}" data-chart="{chart_id}">{svg}</figure>'
        if svg is not None
        else f'<p class="note" id="chart-{chart_id}" data-chart="{chart_id}">no data</p>'
    )
    return (
        f'<div class="card"><h3>{esc(title)}</h3>{body}{table}{f"<p class=note>{esc(note)}</p>" if note else ""}</div>'
    )


def _table(rows: list[tuple[str, str]], head: tuple[str, str] | None = None) -> str:
    h = f"<tr><th>{esc(head[0])}</th><th>{esc(head[1])}</th></tr>" if head else ""
    return "<table>" + h + "".join(f'<tr><td>{esc(k)}</td><td class="n">{v}</td></tr>' for k, v in rows) + "</table>"


def _interval(bounds: list[float]) -> str:
    """`_interval([0.8, 0.95])` -> '80%–95%'."""
    return f"{bounds[0]:.0%}–{bounds[1]:.0%}"


def _single(pairs: list[tuple[str, float]]) -> list[tuple[str, list[tuple[str, float]]]]:
    """One plain bar per label: `[("a", 2)]` -> `[("a", [("a", 2)])]`."""
    return [(k, [(k, v)]) for k, v in pairs]


def render_html(report: dict[str, Any]) -> str:
    """The whole page as a string (well under 1 MB: charts summarise, they never list rows)."""
    parts: list[str] = []
    emulated = bool(report.get("emulated"))
    rows = report.get("rows", 0)
    sc = report.get("status_counts") or {}
    lat = report.get("latency_s") or {}
    out_name = str(report.get("output", "")).rsplit("/", 1)[-1]
    parts.append(
        f"<h1>enrich run report{' — EMULATED' if emulated else ''}</h1>"
        f"<p class=sub>output {esc(out_name)} · processor {esc(report.get('processor', '–'))}"
        f" · journal {esc(str(report.get('journal', '–')).rsplit('/', 1)[-1])}</p>"
    )
    if emulated:
        parts.append(
            '<div class="emulated" id="emulated">EMULATED RUN: every value comes from the local emulator\'s '
            "knowledge table, not web research. Do not use these results.</div>"
        )
    kpis = [
        ("rows", num("rows", rows)),
        ("completed", num("status_counts.completed", sc.get("completed", 0))),
        ("spend", num("spend_usd", report.get("spend_usd"), "$")),
        ("hit rate", num("hit_rate", report.get("hit_rate"))),
        ("latency p50 (s)", num("latency_s.p50", lat.get("p50"))),
        ("latency p95 (s)", num("latency_s.p95", lat.get("p95"))),
    ]
    parts.append(
        '<div class="kpis">'
        + "".join(f"<div class=kpi><b>{v}</b><span>{esc(k)}</span></div>" for k, v in kpis)
        + "</div>"
    )
    cards: list[str] = []

    # rows by status
    cards.append(
        _figure(
            "status",
            "Rows by status",
            hbars(
                _single([(label(k), v) for k, v in sorted(sc.items())]),
                title="Rows by status",
                x_title="rows",
                colours={label(k): STATUS_COLOURS.get(k, "#607d8b") for k in sorted(sc)},
            )
            if sc
            else None,
            _table([(k, num(f"status_counts.{k}", v)) for k, v in sorted(sc.items())]),
        )
    )

    # money
    money = [
        ("spend", report.get("spend_usd")),
        ("budget", report.get("budget_usd")),
        ("estimate", report.get("estimated_cost_usd")),
        ("worst case", report.get("ladder_worst_case_usd")),
    ]
    money_vals = [(k, float(v)) for k, v in money if v is not None]
    cards.append(
        _figure(
            "money",
            "Spend vs budget vs estimate (USD)",
            hbars(
                _single(money_vals),
                title="Spend vs budget vs estimate (USD)",
                x_title="USD",
                colours={"spend": "#1565c0", "budget": "#90a4ae", "estimate": "#ffb300", "worst case": "#ef6c00"},
            )
            if money_vals
            else None,
            _table(
                [
                    ("spend", num("spend_usd", report.get("spend_usd"), "$")),
                    ("budget", num("budget_usd", report.get("budget_usd"), "$")),
                    (
                        "estimate (all rows at list price)",
                        num("estimated_cost_usd", report.get("estimated_cost_usd"), "$"),
                    ),
                    *(
                        [
                            (
                                "worst case (every row on every rung of the ladder)",
                                num("ladder_worst_case_usd", report["ladder_worst_case_usd"], "$"),
                            )
                        ]
                        if "ladder_worst_case_usd" in report
                        else []
                    ),
                    ("CPM: spend per 1,000 completed rows", num("cpm_usd", report.get("cpm_usd"), "$")),
                ]
            ),
        )
    )
    cbp = report.get("cost_by_processor") or {}
    proc_vals = [(label(p), float(d["cost_usd"])) for p, d in cbp.items()]
    cards.append(
        _figure(
            "processors",
            "Cost per processor (every paid run)",
            hbars(_single(proc_vals), title="Cost per processor (USD)", x_title="USD") if proc_vals else None,
            "<table><tr><th>processor</th><th>runs</th><th>USD</th><th>USD / 1,000 runs</th></tr>"
            + "".join(
                f"<tr><td>{esc(p)}</td><td class=n>{num(f'cost_by_processor.{p}.runs', d['runs'])}"
                f"</td><td class=n>{num(f'cost_by_processor.{p}.cost_usd', d['cost_usd'], '$')}</td>"
                f"<td class=n>{num(f'cost_by_processor.{p}.usd_per_1000_runs', d['usd_per_1000_runs'], '$')}"
                "</td></tr>"
                for p, d in cbp.items()
            )
            + "</table>",
            "Every run paid for: completed, failed, superseded by an escalation step or in doubt; sums to the spend.",
        )
    )

    # latency
    byp = lat.get("by_processor") or {}
    bins: dict[tuple[float, str], dict[str, float]] = {}  # (lower edge, bin label) -> processor -> runs
    for p, d in byp.items():
        h = d.get("histogram") or {}
        edges, counts = h.get("edges_s") or [], h.get("counts") or []
        for i, c in enumerate(counts):
            hi = edges[i + 1] if i + 1 < len(edges) and edges[i + 1] is not None else None
            name = f"{edges[i]:g}–{hi:g} s" if hi is not None else f"≥{edges[i]:g} s"
            bins.setdefault((edges[i], name), {})[label(p)] = c
    hist = None
    if bins:
        order = sorted(bins)
        procs = list(dict.fromkeys(label(p) for p in byp))
        hist = vbars(
            [name for _, name in order],
            {p: [bins[b].get(p, 0) for b in order] for p in procs},
            title="Latency per run (seconds)",
            x_title="submit → completion",
            y_title="runs",
        )
    keys = ("count", "mean", "p50", "p90", "p95", "p99", "max")
    lat_table = (
        "<table><tr><th></th>"
        + "".join(f"<th>{k}</th>" for k in keys)
        + "</tr><tr><td>all</td>"
        + "".join(f"<td class=n>{num(f'latency_s.{k}', lat.get(k))}</td>" for k in keys)
        + "</tr>"
        + "".join(
            f"<tr><td>{esc(p)}</td>"
            + "".join(f"<td class=n>{num(f'latency_s.by_processor.{p}.{k}', d.get(k))}</td>" for k in keys)
            + "</tr>"
            for p, d in byp.items()
        )
        + "</table>"
    )
    cards.append(
        _figure(
            "latency",
            "Latency per run (seconds)",
            hist,
            lat_table,
            "Every finished run (completed or failed), created → recorded on the journal's clock; "
            "percentiles are nearest-rank.",
        )
    )

    # confidence
    conf = report.get("confidence_counts") or {}
    levels = sorted(
        {label(k) for c in conf.values() for k in c}, key=lambda k: (["high", "medium", "low", k].index(k), k)
    )
    conf_rows = [
        (label(f), sorted(((label(k), v) for k, v in c.items()), key=lambda kv: levels.index(kv[0])))
        for f, c in conf.items()
    ]
    cards.append(
        _figure(
            "confidence",
            "Confidence per field (completed rows)",
            hbars(
                conf_rows,
                title="Confidence per field (completed rows)",
                x_title="rows",
                colours={k: CONF_COLOURS.get(k, "#8d6e63") for k in levels},
                legend=True,
            )
            if any(c for c in conf.values())
            else None,
            _table(
                [
                    (f"{f}: {k}", num(f"confidence_counts.{f}.{k}", v))
                    for f, c in conf.items()
                    for k, v in sorted(c.items())
                ]
            ),
        )
    )

    # hit and fill rates
    fill = report.get("fill_rate") or {}
    fill_vals = [(label(f), float(v)) for f, v in fill.items() if v is not None]
    cards.append(
        _figure(
            "fill",
            "Hit rate and fill rate per field",
            hbars(
                _single([("(any field: hit rate)", float(report.get("hit_rate") or 0)), *fill_vals]),
                title="Hit rate and fill rate per field",
                x_title="share of all rows",
                x_max=1.0,
            )
            if fill_vals
            else None,
            _table(
                [
                    ("rows with an answer", num("rows_with_answer", report.get("rows_with_answer"))),
                    ("hit rate", num("hit_rate", report.get("hit_rate"))),
                    *((f"fill rate: {f}", num(f"fill_rate.{f}", v)) for f, v in fill.items()),
                ]
            ),
        )
    )

    # domains
    doms = report.get("top_cited_domains") or []
    cards.append(
        _figure(
            "domains",
            "Top cited domains",
            hbars(_single([(label(d), float(n)) for d, n in doms]), title="Top cited domains", x_title="citations")
            if doms
            else None,
            _table([(d, num(f"top_cited_domains.{i}", n)) for i, (d, n) in enumerate(doms)]),
            f"{report.get('citations', 0)} citation URLs in total",
        )
    )

    # decisions (when a confidence gate produced them)
    dec = report.get("decision_counts") or {}
    if dec:
        cards.append(
            _figure(
                "decisions",
                "Decisions",
                hbars(
                    [(label(col), [(label(k), v) for k, v in sorted(c.items())]) for col, c in dec.items()],
                    title="Decisions",
                    x_title="rows",
                    colours={
                        label(k): {"accepted": "#2e7d32", "review": "#f9a825", "rejected": "#c62828"}.get(k, "#607d8b")
                        for k in sorted({k for c in dec.values() for k in c})
                    },
                    legend=True,
                ),
                _table(
                    [
                        (f"{col}: {k}", num(f"decision_counts.{col}.{k}", v))
                        for col, c in dec.items()
                        for k, v in sorted(c.items())
                    ]
                ),
            )
        )
    cal = report.get("calibration") or {}
    if cal.get("levels"):
        cards.append(
            '<div class="card" id="calibration"><h3>Calibration: how often each level was right in your reviews</h3>'
            "<table><tr><th>field</th><th>confidence</th><th>processor</th><th>reviewed</th><th>right</th>"
            "<th>90% interval</th></tr>"
            + "".join(
                f"<tr><td>{esc(lv['field'])}</td><td>{esc(lv['confidence'])}</td><td>{esc(lv['processor'])}</td>"
                f"<td class=n>{esc(lv['reviewed'])}</td><td class=n>{esc(format(lv['share_right'], '.0%'))}</td>"
                f"<td class=n>{esc(_interval(lv['interval_90']))}</td></tr>"
                for lv in cal["levels"]
            )
            + "</table>"
            + "".join(f"<p class=note>{esc(sg['text'])}</p>" for sg in cal.get("suggestions", []))
            + "</div>"
        )
    esc_rows = [(k, num(k, v)) for k, v in sorted(report.items()) if "escalat" in k and isinstance(v, int | float)]
    if esc_rows:
        cards.append(f'<div class="card"><h3>Escalation</h3>{_table(esc_rows)}</div>')

    parts.append('<div class="grid">' + "".join(cards) + "</div>")
    if report.get("timed_out_note"):
        parts.append(f"<p class=note>{esc(report['timed_out_note'])}</p>")
    parts.append(
        "<p class=note>Hit rate: rows with at least one non-empty value ÷ all rows. Fill rate: rows with a "
        "value for the field ÷ all rows. Estimate: all rows × the processor's list price (worst case: on every "
        "rung of the escalation ladder). Every figure here is "
        "copied from the JSON report beside this file.</p>"
    )
    title = f"enrich report: {out_name}{' (EMULATED)' if emulated else ''}"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>" + "".join(parts) + "</body></html>\n"
    )
