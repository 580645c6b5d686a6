"""Calibration from the user's own reviews: is `medium` right on *my* data?

Every verdict records what the reviewer saw (`previous_json`: the value, its confidence and the
processor that gave it). A verdict judges that answer: `accept` says it was right, `correct` and
`reject` say it was wrong. For each (field, confidence level, processor) this counts the answers
reviewed and the share judged right, with a 90% Wilson score interval, and per (field, level) over
every processor it weighs the gate: how many review lines per 1,000 rows a change would save or add
and at what expected error rate, from the job's own confidence counts. Only the latest verdict on a
(row, field) counts (history is append-only; a later verdict replaces an earlier one's judgement).

Suggestions are made only where the evidence supports them: accepting a level that is reviewed
needs at least `MIN_REVIEWS` reviews and a share right whose whole interval clears `ACCEPT_FLOOR`;
reviewing a level that is accepted needs the same count and an interval wholly below
`ACCEPT_SHARE`. Below the count it says there is too little evidence. Nothing is applied: the
config snippet is printed for the user to paste.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from enrich.config import GateRule, RunConfig

Z90 = 1.6448536269514722  # two-sided 90%
MIN_REVIEWS = 20
ACCEPT_SHARE = 0.95  # a level right this often is worth accepting...
ACCEPT_FLOOR = 0.90  # ...when even the interval's low end is at least this
LEVEL_ORDER = ("high", "medium", "low", "none")


def wilson(right: int, n: int, z: float = Z90) -> tuple[float, float]:
    """The Wilson score interval of a share: `wilson(9, 10)` -> (0.652, 0.977) (rounded)."""
    if n == 0:
        return 0.0, 1.0
    p = right / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - spread) / denom), min(1.0, (centre + spread) / denom)


def judged(history: Iterable[tuple[str, str, str, str | None]]) -> list[tuple[str, str, str, bool]]:
    """(field, confidence, processor, right) of the latest verdict per (row, field) that recorded what it
    reviewed, from (row_key, field, verdict, previous_json) oldest first."""
    latest: dict[tuple[str, str], tuple[str, str | None]] = {}
    for row_key, field, verdict, previous in history:
        latest[(row_key, field)] = (verdict, previous)
    out = []
    for (_row, field), (verdict, previous) in latest.items():
        if not previous:
            continue  # recorded before enrich kept what was reviewed
        shown = json.loads(previous)
        confidence = str(shown.get("confidence") or "none")
        if confidence == "human" or shown.get("decision", "").startswith("human"):
            continue  # it reviewed a person's answer, not the API's
        out.append((field, confidence, str(shown.get("processor") or "?"), verdict == "accept"))
    return out


def _stat(right: int, n: int) -> dict[str, Any]:
    low, high = wilson(right, n)
    return {
        "reviewed": n,
        "right": right,
        "share_right": round(right / n, 4),
        "interval_90": [round(low, 4), round(high, 4)],
    }


def calibration(
    cfg: RunConfig, history: Iterable[tuple[str, str, str, str | None]], confidence_counts: Mapping[str, Any], rows: int
) -> dict[str, Any]:
    """The calibration of a job: per (field, level, processor) and per (field, level), the gate's review
    load and expected error now and under the suggested change, suggestions and the config snippet.
    `confidence_counts` and `rows` are the run report's (completed rows' confidence per field, all rows)."""
    per: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    pooled: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for field, level, processor, right in judged(history):
        for cell in (per[(field, level, processor)], pooled[(field, level)]):
            cell[0] += int(right)
            cell[1] += 1
    levels = [
        {"field": f, "confidence": lv, "processor": p, **_stat(r, n)} for (f, lv, p), (r, n) in sorted(per.items())
    ]
    fields: dict[str, Any] = {}
    suggestions: list[dict[str, Any]] = []
    snippet: list[str] = []
    for field in sorted({f for f, _ in pooled} | set(confidence_counts)):
        rule = cfg.gate.rule(field)
        counts = {str(k): int(v) for k, v in (confidence_counts.get(field) or {}).items()}
        per_1000 = {lv: 1000 * counts.get(lv, 0) / rows if rows else 0.0 for lv in LEVEL_ORDER}
        info: dict[str, Any] = {"levels": {}, "gate": {"accept": rule.accept, "review": rule.review}}
        start = {
            lv: "accept" if lv in rule.accept else "review" if lv in rule.review else "reject" for lv in LEVEL_ORDER
        }
        gate = dict(start)
        for lv in LEVEL_ORDER:
            r, n = pooled.get((field, lv), (0, 0))
            if n:
                info["levels"][lv] = _stat(r, n)
        info["review_lines_per_1000_rows"] = round(sum(per_1000[lv] for lv in rule.review), 1)
        accepted_wrong = [
            (1 - pooled[(field, lv)][0] / pooled[(field, lv)][1]) * per_1000[lv]
            for lv in rule.accept
            if pooled.get((field, lv), (0, 0))[1]
        ]
        info["expected_errors_per_1000_rows"] = round(sum(accepted_wrong), 1) if accepted_wrong else None
        for lv in LEVEL_ORDER:
            r, n = pooled.get((field, lv), (0, 0))
            if lv not in rule.review and lv not in rule.accept:
                continue
            if n < MIN_REVIEWS:
                if n:
                    suggestions.append(
                        {
                            "field": field,
                            "confidence": lv,
                            "action": "none",
                            "text": f"{field}: `{lv}` has {n} review{'s' if n != 1 else ''}; too little evidence to "
                            f"judge it (at least {MIN_REVIEWS} needed)",
                        }
                    )
                continue
            low, high = wilson(r, n)
            share = r / n
            said = f"{field}: `{lv}` was right in {share:.0%} [{low:.0%}–{high:.0%}] of {n} reviews"
            if lv in rule.review and share >= ACCEPT_SHARE and low >= ACCEPT_FLOOR:
                action = "accept"
                text = (
                    f"{said}: accepting it would save ~{per_1000[lv]:.0f} review lines per 1,000 rows "
                    f"at an expected ~{1 - share:.0%} error"
                )
                gate[lv] = "accept"
            elif lv in rule.accept and high < ACCEPT_SHARE:
                action = "review"
                text = (
                    f"{said}: it is accepted but wrong in ~{1 - share:.0%}; review it "
                    f"(~{per_1000[lv]:.0f} more review lines per 1,000 rows)"
                )
                gate[lv] = "review"
            else:
                suggestions.append(
                    {"field": field, "confidence": lv, "action": "keep", "text": f"{said}: keep the gate as it is"}
                )
                continue
            lines_key = "saves_review_lines_per_1000_rows" if action == "accept" else "adds_review_lines_per_1000_rows"
            suggestions.append(
                {
                    "field": field,
                    "confidence": lv,
                    "action": action,
                    lines_key: round(per_1000[lv], 1),
                    "expected_error": round(1 - share, 4),
                    "text": text,
                }
            )
        if gate != start:  # one table per field, with every suggested move applied, if the gate stays ordered
            table = _gate_table(field, gate)
            if table:
                snippet += table
            else:
                suggestions.append(
                    {
                        "field": field,
                        "confidence": None,
                        "action": "none",
                        "text": f"{field}: together these moves would accept a level below one that is reviewed; "
                        "no gate is suggested for it",
                    }
                )
        fields[field] = info
    return {
        "reviewed": sum(n for _, n in pooled.values()),
        "min_reviews": MIN_REVIEWS,
        "levels": levels,
        "fields": fields,
        "suggestions": suggestions,
        "config_snippet": "\n".join(snippet).strip(),
    }


def _gate_table(field: str, gate: Mapping[str, str]) -> list[str]:
    """The `[gate.fields.<field>]` lines for a level -> decision map, or [] when it is not a gate the config
    would accept (GateRule's own checks: a better confidence never gets a worse decision)."""
    lists = {d: [lv for lv in LEVEL_ORDER if gate[lv] == d] for d in ("accept", "review", "reject")}
    try:
        GateRule.model_validate(lists)
    except ValueError:
        return []
    return [f"[gate.fields.{field}]", *(f"{d} = {json.dumps(v)}" for d, v in lists.items()), ""]


def format_calibration(cal: dict[str, Any]) -> str:
    """The calibration as text: a table per (field, level, processor), then the suggestions and snippet."""
    if not cal["reviewed"]:
        return "no reviewed answers yet: apply a review file (enrich review apply) and calibrate again"
    lines = [f"{'field':<28} {'confidence':<10} {'processor':<12} {'reviewed':>8} {'right':>7}  90% interval"]
    for lv in cal["levels"]:
        low, high = lv["interval_90"]
        lines.append(
            f"{lv['field']:<28} {lv['confidence']:<10} {lv['processor']:<12} {lv['reviewed']:>8} "
            f"{lv['share_right']:>7.0%}  {low:.0%}–{high:.0%}"
        )
    lines.append("")
    for f, info in cal["fields"].items():
        err = info["expected_errors_per_1000_rows"]
        lines.append(
            f"{f}: {info['review_lines_per_1000_rows']:.0f} review lines per 1,000 rows"
            + (f", ~{err:.0f} wrong answers accepted per 1,000 rows" if err is not None else "")
        )
    lines += ["", "suggestions:"] + [f"  {s['text']}" for s in cal["suggestions"]]
    if cal["config_snippet"]:
        lines += ["", "to apply them, put this in the job's config (nothing was changed):", cal["config_snippet"]]
    return "\n".join(lines)
