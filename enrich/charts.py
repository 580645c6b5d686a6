"""Bar charts as static SVG, drawn directly: no JavaScript engine, no dependency, a few milliseconds.

The run report needs two shapes: horizontal bars (one bar per label, optionally stacked from
coloured segments) and a vertical stacked histogram. Both are plain `<svg>` elements with
`<path>` marks, axis ticks at round numbers and a legend; every text node goes through
`html.escape`, so a label from the web is text, never markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac")
DEFAULT_BAR = "#4c78a8"
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:11px;fill:#333"
ROW_HEIGHT = 22
CHAR_WIDTH = 6.2  # an 11px sans-serif character, on average: enough to size the label column

Segments = Sequence[tuple[str, float]]


def _t(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(x: float) -> str:
    """A coordinate: `_n(12.0)` -> '12', `_n(3.14159)` -> '3.1'."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 up to at least `top`: `ticks(17)` -> [0, 5, 10, 15, 20]."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _fmt(v: float) -> str:
    """A tick label: `_fmt(0.25)` -> '0.25', `_fmt(2000)` -> '2,000'."""
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.4g}"


def colour_of(series: str, colours: Mapping[str, str], order: Sequence[str]) -> str:
    """A series' colour: its own from `colours`, else the palette by its place in `order`."""
    return colours.get(series) or PALETTE[(list(order).index(series) if series in order else 0) % len(PALETTE)]


def _legend(series: Sequence[str], colours: Mapping[str, str], y: float, width: float, x0: float) -> tuple[str, float]:
    out, x = [], x0
    for s in series:
        w = 18 + CHAR_WIDTH * len(s) + 14
        if x + w > width and x > x0:
            x, y = x0, y + 16
        out.append(
            f'<path d="M{_n(x)} {_n(y - 9)}h10v10h-10Z" fill="{_t(colour_of(s, colours, series))}"/>'
            f'<text x="{_n(x + 14)}" y="{_n(y)}">{_t(s)}</text>'
        )
        x += w
    return "".join(out), y + 10


def _svg(width: float, height: float, title: str, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}" role="img" style="{FONT}"><title>{_t(title)}</title>{body}</svg>'
    )


def hbars(
    rows: Sequence[tuple[str, Segments]],
    *,
    title: str,
    x_title: str = "",
    colours: Mapping[str, str] | None = None,
    legend: bool = False,
    x_max: float | None = None,
    width: float = 520,
) -> str:
    """Horizontal bars, one per `(label, segments)`; a bar's segments `(series, value)` are stacked left to
    right in the given order. `x_max` fixes the axis (e.g. 1 for shares); else it fits the longest bar."""
    colours = colours or {}
    series = list(dict.fromkeys(s for _, segs in rows for s, _ in segs))
    label_w = min(200.0, max([*(CHAR_WIDTH * len(lbl) for lbl, _ in rows), 30.0]) + 8)
    plot_x, plot_w = label_w, width - label_w - 16
    top = x_max if x_max is not None else max([*(sum(max(v, 0) for _, v in segs) for _, segs in rows), 0.0])
    tick_values = ticks(top) if x_max is None else [x_max * i / 4 for i in range(5)]
    scale_max = tick_values[-1] or 1.0
    plot_h = ROW_HEIGHT * len(rows)
    body: list[str] = []
    for v in tick_values:  # grid and tick labels under the bars
        x = plot_x + plot_w * v / scale_max
        body.append(
            f'<path d="M{_n(x)} 4v{_n(plot_h)}" stroke="#e6e6e6"/>'
            f'<text x="{_n(x)}" y="{_n(plot_h + 18)}" text-anchor="middle">{_t(_fmt(v))}</text>'
        )
    fits = max(int((label_w - 8) / CHAR_WIDTH), 5)
    for i, (lbl, segs) in enumerate(rows):
        y = 4 + i * ROW_HEIGHT
        shown = (
            lbl if len(lbl) <= fits else f"{lbl[: (fits - 1) // 2]}…{lbl[len(lbl) - (fits - 1 - (fits - 1) // 2) :]}"
        )
        body.append(
            f'<text x="{_n(plot_x - 6)}" y="{_n(y + ROW_HEIGHT / 2 + 4)}" text-anchor="end">{_t(shown)}'
            f"<title>{_t(lbl)}</title></text>"
        )
        x = plot_x
        for s, v in segs:
            w = plot_w * max(v, 0) / scale_max
            if w <= 0:
                continue
            fill = colour_of(s, colours, series) if (colours or legend) else DEFAULT_BAR
            body.append(
                f'<path d="M{_n(x)} {_n(y + 3)}h{_n(w)}v{ROW_HEIGHT - 6}h-{_n(w)}Z" fill="{_t(fill)}">'
                f"<title>{_t(f'{lbl}: {s} {_fmt(v)}' if s != lbl else f'{lbl}: {_fmt(v)}')}</title></path>"
            )
            x += w
    body.append(f'<path d="M{_n(plot_x)} 4v{_n(plot_h)}" stroke="#888"/>')
    height: float = plot_h + 24
    if x_title:
        body.append(
            f'<text x="{_n(plot_x + plot_w / 2)}" y="{_n(height + 10)}" text-anchor="middle">{_t(x_title)}</text>'
        )
        height += 16
    if legend and series:
        items, height = _legend(series, colours, height + 14, width, plot_x)
        body.append(items)
    return _svg(width, height + 4, title, "".join(body))


def vbars(
    bins: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    x_title: str = "",
    y_title: str = "",
    colours: Mapping[str, str] | None = None,
    width: float = 520,
    plot_h: float = 180,
) -> str:
    """A vertical histogram: one column per bin, each series' count in that bin stacked bottom-up."""
    colours = colours or {}
    names = list(series)
    totals = [sum(max(series[s][i], 0) for s in names) for i in range(len(bins))]
    tick_values = ticks(max([*totals, 0.0]))
    scale_max = tick_values[-1] or 1.0
    plot_x = 12 + CHAR_WIDTH * max(len(_fmt(v)) for v in tick_values) + 14
    plot_w = width - plot_x - 10
    col_w = plot_w / max(len(bins), 1)
    body: list[str] = []
    if y_title:
        body.append(
            f'<text transform="translate(10 {_n(4 + plot_h / 2)}) rotate(-90)" text-anchor="middle">{_t(y_title)}</text>'
        )
    for v in tick_values:
        y = 4 + plot_h - plot_h * v / scale_max
        body.append(
            f'<path d="M{_n(plot_x)} {_n(y)}h{_n(plot_w)}" stroke="#e6e6e6"/>'
            f'<text x="{_n(plot_x - 4)}" y="{_n(y + 4)}" text-anchor="end">{_t(_fmt(v))}</text>'
        )
    longest = 0.0
    for i, b in enumerate(bins):
        x = plot_x + i * col_w
        base = 4 + plot_h
        for s in names:
            v = max(series[s][i], 0)
            h = plot_h * v / scale_max
            if h > 0:
                body.append(
                    f'<path d="M{_n(x + 2)} {_n(base - h)}h{_n(col_w - 4)}v{_n(h)}h-{_n(col_w - 4)}Z" '
                    f'fill="{_t(colour_of(s, colours, names))}"><title>{_t(f"{b}: {s} {_fmt(v)}")}</title></path>'
                )
                base -= h
        cx, cy = x + col_w / 2, 4 + plot_h + 12
        body.append(f'<text transform="translate({_n(cx)} {_n(cy)}) rotate(-30)" text-anchor="end">{_t(b)}</text>')
        longest = max(longest, CHAR_WIDTH * len(b))
    body.append(f'<path d="M{_n(plot_x)} {_n(4 + plot_h)}h{_n(plot_w)}" stroke="#888"/>')
    height = 4 + plot_h + 12 + longest * 0.5 + 8
    if x_title:
        body.append(
            f'<text x="{_n(plot_x + plot_w / 2)}" y="{_n(height + 8)}" text-anchor="middle">{_t(x_title)}</text>'
        )
        height += 14
    if names:
        items, height = _legend(names, colours, height + 16, width, plot_x)
        body.append(items)
    return _svg(width, height + 4, title, "".join(body))
