"""The pilot's page beside the run report: a chart of cost vs accepted share per strategy, and the tables.

Static HTML with an inline SVG drawn with charts.py's axes and palette; every text (strategy names, field
names, processors) goes through `html.escape`, so nothing from a config or a result becomes markup.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from enrich.charts import FONT, PALETTE, ticks

WIDTH, HEIGHT = 640.0, 380.0
LEFT, RIGHT, TOP, BOTTOM = 64.0, 24.0, 28.0, 48.0


def _t(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


CHAR_W, LINE_H = 7.0, 11.0  # a digit's advance and a line's height at the chart's 11px font


def place_labels(points: list[tuple[float, float, float]], texts: list[str]) -> list[tuple[float, float]]:
    """A text baseline (x, y) for each point's label (points are (x, y, radius)): the first of eight spots around
    the point whose box overlaps no label placed before it and no point, else the first spot, so strategies that
    land close together keep readable numbers.

    >>> place_labels([(100, 100, 4), (104, 100, 4)], ["1", "2"])
    [(106.0, 115.0), (110.0, 96.0)]
    """
    placed: list[tuple[float, float, float, float]] = []  # label boxes: left, top, right, bottom

    def clear(box: tuple[float, float, float, float]) -> bool:
        left, top, right, bottom = box
        if any(left < b[2] and b[0] < right and top < b[3] and b[1] < bottom for b in placed):
            return False
        return not any(
            left < px + pr and px - pr < right and top < py + pr and py - pr < bottom for px, py, pr in points
        )

    out = []
    for (x, y, r), text in zip(points, texts, strict=True):
        w = CHAR_W * len(text)
        spots = [
            (x + r + 2, y - r), (x + r + 2, y + r + LINE_H), (x - r - 2 - w, y - r), (x - r - 2 - w, y + r + LINE_H),
            (x - w / 2, y - r - 3), (x - w / 2, y + r + LINE_H + 3), (x + r + 2, y + LINE_H / 2 - 1),
            (x - r - 2 - w, y + LINE_H / 2 - 1),
        ]  # fmt: skip
        boxes = [(sx, sy - LINE_H + 2, sx + w, sy + 2) for sx, sy in spots]
        k = next((k for k, b in enumerate(boxes) if clear(b)), 0)
        placed.append(boxes[k])
        out.append((float(spots[k][0]), float(spots[k][1])))
    return out


def scatter(strategies: list[Mapping[str, Any]]) -> str:
    """One point per strategy at (full-run cost, accepted share) with its 90% intervals as whiskers; the
    recommended one drawn larger and named in the title. Labels are numbers drawn beside the points, keyed to the
    table below the chart (a long strategy name never overlaps another), each placed clear of the others where one
    of eight spots around its point allows (`place_labels`)."""
    xs = [s["to_pay_interval_usd"][1] for s in strategies] or [1.0]
    xt = ticks(max(xs) or 1.0)
    x_top = xt[-1] or 1.0
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(v: float) -> float:
        return LEFT + pw * v / x_top

    # the share axis starts at the lowest interval's tenth below, so strategies a few points apart stay apart
    floor = min([0.9, *(s["accepted_interval"][0] for s in strategies)])
    y0 = max(0.0, int(floor * 10) / 10)

    def py(share: float) -> float:
        return TOP + ph * (1 - (share - y0) / (1 - y0))

    body = []
    for v in xt:
        body.append(
            f'<path d="M{_n(px(v))} {_n(TOP)}V{_n(TOP + ph)}" stroke="#eee"/>'
            f'<text x="{_n(px(v))}" y="{_n(TOP + ph + 16)}" text-anchor="middle">${_t(f"{v:,.4g}")}</text>'
        )
    steps = round((1 - y0) * 10)
    for i in range(steps + 1):
        share = y0 + i / 10
        body.append(
            f'<path d="M{_n(LEFT)} {_n(py(share))}H{_n(LEFT + pw)}" stroke="#eee"/>'
            f'<text x="{_n(LEFT - 6)}" y="{_n(py(share) + 4)}" text-anchor="end">{share:.0%}</text>'
        )
    body.append(
        f'<text x="{_n(LEFT + pw / 2)}" y="{_n(HEIGHT - 10)}" text-anchor="middle">full-run cost (USD)</text>'
        f'<text transform="translate(14 {_n(TOP + ph / 2)}) rotate(-90)" text-anchor="middle">accepted share</text>'
    )
    points = [(px(s["to_pay_usd"]), py(s["accepted"]), 7.0 if s["recommended"] else 4.0) for s in strategies]
    labels = place_labels(points, [str(i + 1) for i in range(len(strategies))])
    for i, s in enumerate(strategies):
        x, y = px(s["to_pay_usd"]), py(s["accepted"])
        lo, hi = s["to_pay_interval_usd"]
        alo, ahi = s["accepted_interval"]
        colour = PALETTE[i % len(PALETTE)]
        r = 7 if s["recommended"] else 4
        body.append(
            f"<g><title>{_t(s['name'])}: ${s['to_pay_usd']:,.4f}, {s['accepted']:.0%} accepted</title>"
            f'<path d="M{_n(px(lo))} {_n(y)}H{_n(px(hi))}M{_n(x)} {_n(py(alo))}V{_n(py(ahi))}" '
            f'stroke="{colour}" opacity="0.6"/>'
            f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{r}" fill="{colour}"'
            + (' stroke="#000" stroke-width="2"' if s["recommended"] else "")
            + f'/><text x="{_n(labels[i][0])}" y="{_n(labels[i][1])}">{i + 1}</text></g>'
        )
    rec = next((s["name"] for s in strategies if s["recommended"]), "")
    title = f"Cost vs accepted share per strategy (recommended: {rec})"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(WIDTH)}" height="{_n(HEIGHT)}" '
        f'viewBox="0 0 {_n(WIDTH)} {_n(HEIGHT)}" role="img" style="{FONT}"><title>{_t(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def render(data: Mapping[str, Any]) -> str:
    """The whole page for a pilot's findings (`pilot.compare` plus what job.pilot_job adds)."""
    strategies = list(data["strategies"])
    rows = []
    for i, s in enumerate(strategies):
        lo, hi = s["to_pay_interval_usd"]
        alo, ahi = s["accepted_interval"]
        rows.append(
            f"<tr{' class=rec' if s['recommended'] else ''}><td>{i + 1}</td><td>{_t(s['name'])}</td>"
            f"<td>${s['to_pay_usd']:,.4f}</td><td>${lo:,.4f} – ${hi:,.4f}</td><td>{s['accepted']:.1%}</td>"
            f"<td>{alo:.1%} – {ahi:.1%}</td><td>{s['duration_s']:,.0f} s</td></tr>"
        )
    procs = []
    for p, r in data["processors"].items():
        per = "<br>".join(
            f"{_t(f)}: {d['accepted']:.0%} / {d['review']:.0%} / {d['rejected']:.0%}"
            + ("" if r["agreement"].get(f) is None else f" (agrees {r['agreement'][f]:.0%})")
            for f, d in r["decisions"].items()
        )
        p50 = "–" if r["latency_p50_s"] is None else f"{r['latency_p50_s']:.1f} s"
        p95 = "–" if r["latency_p95_s"] is None else f"{r['latency_p95_s']:.1f} s"
        procs.append(
            f"<tr><td>{_t(p)}</td><td>{r['runs']}</td><td>{r['fill_rate']:.0%}</td><td>{p50}</td><td>{p95}</td>"
            f"<td>${r['cost_usd']:,.4f}</td><td>{per}</td></tr>"
        )
    rec = data["recommended"]
    emulated = (
        "<p class=warn>EMULATED: these runs were made against the emulator, whose quality model is synthetic.</p>"
        if data.get("emulated")
        else ""
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>enrich pilot</title>"
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
        ".rec{font-weight:bold;background:#f4f8ff}.warn{color:#a40}pre{background:#f6f6f6;padding:1em}</style>"
        f"</head><body><h1>Pilot: {_t(data.get('job', ''))}</h1>{emulated}"
        f"<p>{data['sample_rows']} sampled rows (seed {_t(data.get('seed', ''))}) of {data['rows_total']:,} to research; "
        f"paid ${data.get('paid_usd', 0):,.4f} now. Intervals are 90% (cost: a bootstrap over the sampled rows; "
        "accepted share: a posterior predictive, Jeffreys prior).</p>"
        f"{scatter(strategies)}"
        "<h2>Strategies</h2><table><tr><th>#</th><th>strategy</th><th>full run pays</th><th>90% interval</th>"
        "<th>accepted</th><th>90% interval</th><th>duration</th></tr>" + "".join(rows) + "</table>"
        f"<h2>Recommended: {_t(rec['name'])}</h2><p>Picked by the {_t(rec['why'])}.{_corrected(rec)}</p>"
        f"<pre>{_t(rec['toml'])}</pre>{_most(data)}"
        "<h2>Processors</h2><table><tr><th>processor</th><th>runs</th><th>fill</th><th>p50</th><th>p95</th>"
        "<th>sample cost</th><th>accepted / review / rejected per field</th></tr>" + "".join(procs) + "</table>"
        "</body></html>"
    )


def _corrected(s: Mapping[str, Any]) -> str:
    raw = s.get("accepted_uncorrected")
    if raw is None:
        return ""
    return (
        f" Its accepted share is corrected for being picked on this sample (bootstrap selection optimism): "
        f"{raw:.1%} before, {s['accepted']:.1%} after."
    )


def _most(data: Mapping[str, Any]) -> str:
    most, rec = data.get("most_accepted"), data["recommended"]
    if most is None:
        return ""
    if most["name"] == rec["name"]:
        return "<p>It is also the strategy with the most accepted share.</p>"
    alo, ahi = most["accepted_interval"]
    return (
        f"<h2>Most accepted share: {_t(most['name'])}</h2><p>{most['accepted']:.1%} accepted "
        f"({alo:.1%} – {ahi:.1%}), the full run pays ${most['to_pay_usd']:,.4f}.{_corrected(most)}</p>"
        f"<pre>{_t(most['toml'])}</pre>"
    )
