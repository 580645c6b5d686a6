"""The pilot's arithmetic (issue 16): what a sample researched on each processor says about every strategy.

Pure: no I/O, no journal, no clock. `job.pilot_job` researches the sample (ordinary journaled runs in the
job's own journal) and hands this module, per sampled row, one `Observation` per processor: the gate's
decision per field, the values, the run's latency. From those it computes

- `processor_report`: per processor, decision shares per field, fill rate, agreement with the strongest
  listed processor's answer, latency p50/p95 and cost;
- `strategies`: every single processor and every ladder climbing the listed processors in order (each
  ordered subsequence of length >= 2), each with `on = ["rejected"]` and `on = ["rejected", "review"]`;
- `forecast`: for one strategy over the whole file, the expected cost and accepted share with 90% bootstrap
  intervals (the sample's rows resampled with replacement, seeded) and the expected duration;
- `recommend`: the cheapest strategy whose expected accepted share meets the target, else the one with the
  most accepted fields per dollar; `toml_snippet` prints it as `[task]`/`[escalate]` tables.

A strategy is replayed on a sampled row exactly as escalation runs it (decide.escalate_pass): start on the
ladder's first processor, keep per field the best decision so far (gate.merge ranks the decision first), and
climb to the next processor while any field's decision is in `on`. Rows the pilot researched are not paid
again by the full run, and there they keep the best answer across every processor of the ladder (the full
run merges every result it holds), so the forecast counts them that way.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DECISIONS = ("accepted", "review", "rejected")
_RANK = {"rejected": 0, "review": 1, "accepted": 2}  # as gate.merge ranks a field's answers: decision first
ONS: tuple[tuple[str, ...], ...] = (("rejected",), ("rejected", "review"))
INTERVAL = (0.05, 0.95)  # a 90% interval
BOOTSTRAP = 1000


@dataclass(frozen=True)
class Observation:
    """One sampled row on one processor: the gate's decision per field, the values, the run's latency (None:
    unknown, e.g. a result from the shared cache). A run that gave no result is `None` in the sample instead."""

    decisions: Mapping[str, str]
    values: Mapping[str, Any]
    latency_s: float | None = None


Row = Mapping[str, Observation | None]  # processor -> what it gave for this row (None: no result)


@dataclass(frozen=True)
class Strategy:
    """A processor alone (`on` empty) or a ladder climbed while any field's decision is in `on`."""

    ladder: tuple[str, ...]
    on: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """`Strategy(("lite", "core"), ("rejected",)).name` -> 'lite>core on rejected'."""
        if len(self.ladder) == 1:
            return self.ladder[0]
        return ">".join(self.ladder) + " on " + "+".join(self.on)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ladder": list(self.ladder), "on": list(self.on)}


@dataclass(frozen=True)
class Limits:
    """What bounds the full run's pace: runs at once, creating POSTs per minute, runs per POST."""

    max_in_flight: int
    requests_per_minute: int
    batch_size: int


@dataclass
class Forecast:
    """One strategy over the whole file. Money in USD; shares of (row, field) cells; `lo`/`hi`: 90% interval."""

    strategy: Strategy
    cost_per_row_usd: float
    to_pay_usd: float  # what the full run still pays (rows the pilot researched are not paid again)
    to_pay_lo: float
    to_pay_hi: float
    cost_usd: float  # the whole file at this strategy's rate, as if nothing had been paid yet
    accepted: float  # expected share of fields accepted in the whole file's output
    accepted_lo: float
    accepted_hi: float
    duration_s: float
    climbs: dict[str, float] = field(default_factory=dict)  # share of rows reaching each rung
    recommended: bool = False

    def as_dict(self) -> dict[str, Any]:
        r = 6
        return {
            **self.strategy.as_dict(),
            "cost_per_row_usd": round(self.cost_per_row_usd, r),
            "to_pay_usd": round(self.to_pay_usd, r),
            "to_pay_interval_usd": [round(self.to_pay_lo, r), round(self.to_pay_hi, r)],
            "cost_usd": round(self.cost_usd, r),
            "accepted": round(self.accepted, 4),
            "accepted_interval": [round(self.accepted_lo, 4), round(self.accepted_hi, 4)],
            "duration_s": round(self.duration_s, 1),
            "reaching": {p: round(s, 4) for p, s in self.climbs.items()},
            "recommended": self.recommended,
        }


def strategies(processors: Sequence[str]) -> list[Strategy]:
    """Every single processor, then every ordered subsequence of length >= 2 under each `on`.

    >>> [s.name for s in strategies(["lite", "core"])]
    ['lite', 'core', 'lite>core on rejected', 'lite>core on rejected+review']
    """
    out = [Strategy((p,)) for p in processors]
    for n in range(2, len(processors) + 1):
        for ladder in itertools.combinations(processors, n):  # combinations keep the listed (climbing) order
            out += [Strategy(tuple(ladder), on) for on in ONS]
    return out


def _best(a: str, b: str) -> str:
    return a if _RANK.get(a, -1) >= _RANK.get(b, -1) else b


def merged(row: Row, processors: Sequence[str], fields: Sequence[str]) -> dict[str, str]:
    """Per field, the best decision among `processors`' observations of the row (a missing one gives nothing).

    >>> o = lambda *d: Observation(dict(zip("ab", d)), {})
    >>> merged({"lite": o("review", "accepted"), "core": o("accepted", "rejected")}, ["lite", "core"], "ab")
    {'a': 'accepted', 'b': 'accepted'}
    """
    out = dict.fromkeys(fields, "rejected")
    for p in processors:
        obs = row.get(p)
        if obs is not None:
            for f in fields:
                out[f] = _best(out[f], obs.decisions.get(f, "rejected"))
    return out


@dataclass(frozen=True)
class Outcome:
    """A strategy replayed on one row: processors paid for (in order), cost, fields accepted."""

    tried: tuple[str, ...]
    cost_micros: int
    accepted: int


def replay(row: Row, strategy: Strategy, fields: Sequence[str], prices: Mapping[str, int]) -> Outcome:
    """Escalation on one sampled row: pay the first rung, climb while any field's merged decision is in `on`.

    >>> o = lambda d: Observation({"a": d}, {})
    >>> row = {"lite": o("rejected"), "base": o("review"), "core": o("accepted")}
    >>> replay(row, Strategy(("lite", "base", "core"), ("rejected",)), ["a"], {"lite": 5, "base": 10, "core": 25})
    Outcome(tried=('lite', 'base'), cost_micros=15, accepted=0)
    """
    tried: list[str] = []
    decisions: dict[str, str] = {}
    for p in strategy.ladder:
        tried.append(p)
        decisions = merged(row, tried, fields)
        if not any(d in strategy.on for d in decisions.values()):
            break
    return Outcome(tuple(tried), sum(prices[p] for p in tried), sum(1 for d in decisions.values() if d == "accepted"))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default).

    >>> quantile([1, 2, 3, 4], 0.5), quantile([5], 0.95), quantile([0, 10], 0.05)
    (2.5, 5.0, 0.5)
    """
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def resamples(n: int, seed: int, count: int = BOOTSTRAP) -> list[list[int]]:
    """`count` bootstrap resamples of row positions 0..n-1 (with replacement), the same for a given seed."""
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(count)] if n else []


def predictive(values: Sequence[float], boot: list[list[int]], rest: int, seed: int) -> list[float]:
    """Bootstrap draws of what the mean over `rest` rows not sampled may be, one per resample in `boot`: the
    resample's mean (what the rate may be) plus the scatter of a mean of `rest` rows around it (normal, with the
    resample's own variance), each draw's distance from the sample's mean scaled by sqrt(n / (n - 1)) (a resample's
    variance is the biased one). Without the scatter and the scaling, 90% intervals held the actual rest's mean in
    about 85% of 50-row samples on the emulator; with them, closer to 90% (README, Choose on evidence).

    >>> predictive([1.0, 1.0, 1.0], resamples(3, 0, 4), 100, 0)
    [1.0, 1.0, 1.0, 1.0]
    """
    n = len(values)
    if n == 0:
        return []
    m = sum(values) / n
    k = math.sqrt(n / (n - 1)) if n > 1 else 1.0
    rng = random.Random(seed * 7919 + 1)
    out = []
    for idx in boot:
        xs = [values[i] for i in idx]
        mb = sum(xs) / n
        var = sum((x - mb) ** 2 for x in xs) / n
        draw = mb + (rng.gauss(0.0, math.sqrt(var / rest)) if rest and var > 0 else 0.0)
        out.append(m + (draw - m) * k)
    return out


def duration_s(runs_per_rung: Mapping[str, float], latencies: Mapping[str, Sequence[float]], limits: Limits) -> float:
    """The full run's expected duration: the runs' total busy time spread over `max_in_flight` slots, or the
    creating POSTs at `requests_per_minute`, whichever is longer, plus the slowest rung's tail (p95) for each rung a
    row climbs, since a row's steps run one after another.

    >>> duration_s({"lite": 100}, {"lite": [10.0, 10.0]}, Limits(10, 60, 50))
    110.0
    """
    busy = sum(n * _mean(latencies.get(p, ())) for p, n in runs_per_rung.items())
    posts = sum(math.ceil(n / limits.batch_size) for n in runs_per_rung.values() if n > 0)
    pace = max(busy / limits.max_in_flight, posts * 60.0 / limits.requests_per_minute)
    tail = sum(quantile(latencies.get(p) or [0.0], 0.95) for p, n in runs_per_rung.items() if n > 0)
    return pace + tail


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def forecast(
    sample: Sequence[Row],
    fields: Sequence[str],
    strategy: Strategy,
    prices: Mapping[str, int],
    *,
    rows_total: int,
    limits: Limits,
    seed: int = 0,
    boot: list[list[int]] | None = None,
) -> Forecast:
    """One strategy over a file of `rows_total` inputs to research, of which the sample's rows are some (the full
    run pays only for the other `rows_total - len(sample)`, and the sampled ones keep their best answer across
    the ladder). The intervals come from `boot` (resamples of the sample's rows; `resamples(len(sample), seed)`
    when not given) and cover what the sample does not know: the rate on the rows not sampled."""
    n = len(sample)
    nf = max(1, len(fields))
    outcomes = [replay(r, strategy, fields, prices) for r in sample]
    cost = [o.cost_micros / 1e6 for o in outcomes]
    acc = [o.accepted / nf for o in outcomes]
    rest = max(0, rows_total - n)
    total = rest + n
    piloted = sum(sum(1 for d in merged(r, strategy.ladder, fields).values() if d == "accepted") / nf for r in sample)
    if n == 0:
        return Forecast(strategy, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def whole(mean_acc: float) -> float:  # the sampled rows as the full run keeps them, the rest at the rate
        return (piloted + rest * mean_acc) / total

    boot = boot if boot is not None else resamples(n, seed)
    cost_means = predictive(cost, boot, rest, seed) or [_mean(cost)]
    acc_means = [min(1.0, max(0.0, x)) for x in predictive(acc, boot, rest, seed)] or [_mean(acc)]
    mean_cost, mean_acc = _mean(cost), _mean(acc)
    reaching = {p: sum(1 for o in outcomes if p in o.tried) / n for p in strategy.ladder}
    lat: dict[str, list[float]] = {p: [] for p in strategy.ladder}
    for r in sample:
        for p in strategy.ladder:
            obs = r.get(p)
            if obs is not None and obs.latency_s is not None:
                lat[p].append(obs.latency_s)
    return Forecast(
        strategy,
        cost_per_row_usd=mean_cost,
        to_pay_usd=rest * mean_cost,
        to_pay_lo=rest * quantile(cost_means, INTERVAL[0]),
        to_pay_hi=rest * quantile(cost_means, INTERVAL[1]),
        cost_usd=rows_total * mean_cost,
        accepted=whole(mean_acc),
        accepted_lo=whole(quantile(acc_means, INTERVAL[0])),
        accepted_hi=whole(quantile(acc_means, INTERVAL[1])),
        duration_s=duration_s({p: rest * s for p, s in reaching.items()}, lat, limits),
        climbs=reaching,
    )


def recommend(forecasts: Sequence[Forecast], target: float) -> tuple[int, str]:
    """The index of the strategy to use and why: the cheapest (full-run cost) whose expected accepted share meets
    `target` (ties: the more accepted), else the most accepted share per dollar (a free strategy counts as best).
    """
    if not forecasts:
        raise ValueError("no strategies to choose from")
    meeting = [i for i, f in enumerate(forecasts) if f.accepted >= target]
    if meeting:
        i = min(meeting, key=lambda i: (round(forecasts[i].cost_per_row_usd, 9), -forecasts[i].accepted))
        return i, f"the cheapest strategy expected to accept at least {target:.0%} of fields"

    def per_dollar(i: int) -> float:
        c = forecasts[i].cost_per_row_usd
        return math.inf if c <= 0 else forecasts[i].accepted / c

    i = max(range(len(forecasts)), key=lambda i: (per_dollar(i), forecasts[i].accepted))
    return i, f"no strategy is expected to accept {target:.0%} of fields: the most accepted fields per dollar"


def toml_snippet(strategy: Strategy) -> str:
    """The strategy as config tables to paste (nothing is written to the config).

    >>> print(toml_snippet(Strategy(("lite", "core"), ("rejected",))))
    [task]
    processor = "lite"
    <BLANKLINE>
    [escalate]
    processors = ["core"]
    on = ["rejected"]
    """
    lines = ["[task]", f"processor = {json.dumps(strategy.ladder[0])}"]
    if len(strategy.ladder) > 1:
        lines += ["", "[escalate]", f"processors = {json.dumps(list(strategy.ladder[1:]))}"]
        lines.append(f"on = {json.dumps(list(strategy.on))}")
    else:
        lines.append("# and no [escalate] table")
    return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    """Two answers agree: equal after canonical JSON, text compared without case or surrounding space."""

    def norm(v: Any) -> Any:
        return v.strip().casefold() if isinstance(v, str) else v

    return json.dumps(norm(a), sort_keys=True, default=str) == json.dumps(norm(b), sort_keys=True, default=str)


def processor_report(
    sample: Sequence[Row], fields: Sequence[str], processors: Sequence[str], prices: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    """Per processor: decision shares per field, fill rate (overall and per field), agreement per field with the
    strongest listed processor's answer (over rows where that one has a value), latency p50/p95, runs that gave a
    result, and the cost of the sample on it at list price."""
    strongest = processors[-1]
    out: dict[str, dict[str, Any]] = {}
    for p in processors:
        obs = [r.get(p) for r in sample]
        got = [o for o in obs if o is not None]
        shares: dict[str, dict[str, float]] = {}
        fill: dict[str, float] = {}
        agree: dict[str, float | None] = {}
        for f in fields:
            counts = dict.fromkeys(DECISIONS, 0)
            for o in obs:
                counts[o.decisions.get(f, "rejected") if o is not None else "rejected"] += 1
            shares[f] = {d: round(c / len(sample), 4) if sample else 0.0 for d, c in counts.items()}
            fill[f] = round(sum(1 for o in got if o.values.get(f) is not None) / len(sample), 4) if sample else 0.0
            pairs: list[tuple[Observation | None, Observation]] = []
            for o, r in zip(obs, sample, strict=True):
                if (s := r.get(strongest)) is not None and s.values.get(f) is not None:
                    pairs.append((o, s))
            same = sum(1 for o, s in pairs if o is not None and _same(o.values.get(f), s.values.get(f)))
            agree[f] = round(same / len(pairs), 4) if pairs else None
        lat = [o.latency_s for o in got if o.latency_s is not None]
        out[p] = {
            "runs": len(got),
            "decisions": shares,
            "fill_rate": round(_mean(list(fill.values())), 4),
            "fill_rate_by_field": fill,
            "agreement_with": strongest,
            "agreement": agree,
            "latency_p50_s": round(quantile(lat, 0.5), 3) if lat else None,
            "latency_p95_s": round(quantile(lat, 0.95), 3) if lat else None,
            "cost_usd": round(len(sample) * prices[p] / 1e6, 6),
        }
    return out


def compare(
    sample: Sequence[Row],
    fields: Sequence[str],
    processors: Sequence[str],
    prices: Mapping[str, int],
    *,
    rows_total: int,
    limits: Limits,
    seed: int,
    target: float,
) -> dict[str, Any]:
    """The pilot's findings: the processor report, every strategy's forecast (one set of resamples for all, so
    they are compared on the same draws) and the recommended strategy with its config snippet."""
    boot = resamples(len(sample), seed)
    fcs = [
        forecast(sample, fields, s, prices, rows_total=rows_total, limits=limits, seed=seed, boot=boot)
        for s in strategies(processors)
    ]
    i, why = recommend(fcs, target)
    fcs[i].recommended = True
    return {
        "sample_rows": len(sample),
        "rows_total": rows_total,
        "fields": list(fields),
        "processors": processor_report(sample, fields, processors, prices),
        "strategies": [f.as_dict() for f in fcs],
        "target_accepted": target,
        "recommended": {"name": fcs[i].strategy.name, "why": why, "toml": toml_snippet(fcs[i].strategy)},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def format_pilot(data: Mapping[str, Any]) -> str:
    """The pilot's findings for people: per processor, then every strategy, then the recommendation."""
    lines = [
        f"pilot: {data['sample_rows']} sampled rows of {data['rows_total']:,} to research, "
        f"paid ${data.get('paid_usd', 0):,.4f} now",
        "",
        f"{'processor':<12} {'runs':>5} {'fill':>5} {'p50 s':>7} {'p95 s':>7} {'cost':>9}  accepted/review/rejected "
        "per field (agreement with the strongest)",
    ]
    for p, r in data["processors"].items():
        per = "; ".join(
            f"{f} {_pct(d['accepted'])}/{_pct(d['review'])}/{_pct(d['rejected'])} ({_pct(r['agreement'].get(f))})"
            for f, d in r["decisions"].items()
        )
        p50 = "-" if r["latency_p50_s"] is None else f"{r['latency_p50_s']:.1f}"
        p95 = "-" if r["latency_p95_s"] is None else f"{r['latency_p95_s']:.1f}"
        lines.append(
            f"{p:<12} {r['runs']:>5} {_pct(r['fill_rate']):>5} {p50:>7} {p95:>7} ${r['cost_usd']:>8.4f}  {per}"
        )
    w = max([8, *(len(s["name"]) for s in data["strategies"])])
    lines += [
        "",
        f"forecast for the whole file (90% intervals); the full run pays only for the "
        f"{max(0, data['rows_total'] - data['sample_rows']):,} rows not sampled",
        f"  {'strategy':<{w}} {'to pay':>10} {'interval':>21} {'accepted':>9} {'interval':>11} {'duration':>9}",
    ]
    for s in data["strategies"]:
        lo, hi = s["to_pay_interval_usd"]
        alo, ahi = s["accepted_interval"]
        mark = "*" if s["recommended"] else " "
        lines.append(
            f"{mark} {s['name']:<{w}} ${s['to_pay_usd']:>9.4f} ${lo:>9.4f}-${hi:<9.4f} {_pct(s['accepted']):>9} "
            f"{_pct(alo):>5}-{_pct(ahi):<5} {_duration(s['duration_s']):>9}"
        )
    rec = data["recommended"]
    lines += ["", f"recommended (*): {rec['name']}: {rec['why']}; paste into the config:", "", rec["toml"]]
    return "\n".join(lines)


def _duration(s: float) -> str:
    """`_duration(42)` -> '42s', `_duration(4000)` -> '1.1h'."""
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"
