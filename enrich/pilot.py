"""The pilot's arithmetic (issue 16): what a sample researched on each processor says about every strategy.

Pure: no I/O, no journal, no clock. `job.pilot_job` researches the sample (ordinary journaled runs in the
job's own journal) and hands this module, per sampled row, one `Observation` per processor: the gate's
decision per field, the values, the run's latency. From those it computes

- `processor_report`: per processor, decision shares per field, fill rate, agreement with the strongest
  listed processor's answer, latency p50/p95 and cost;
- `strategies`: every single processor and every ladder climbing the listed processors in order (each
  ordered subsequence of length >= 2), each with `on = ["rejected"]`, `on = ["review"]` and `on = ["rejected", "review"]`;
- `forecast`: for one strategy over the whole file, the expected cost with a 90% bootstrap interval (the sample's
  rows resampled with replacement, seeded), the accepted share with a 90% interval from the posterior predictive of
  a binomial share (`share_predictive`: Jeffreys' prior, counts discounted by the design effect of fields within a
  row), and the expected duration;
- `recommend`: the cheapest strategy whose expected accepted share meets the target, else the one with the
  most accepted fields per dollar; `toml_snippet` prints it as `[task]`/`[escalate]` tables;
- `selection_optimism`: how much a strategy's sample share flatters it *because* a rule picked it (the winner's
  curse), estimated by Efron's bootstrap optimism; `compare` subtracts it from the recommended strategy's (and the
  most accepted one's) accepted share and widens its interval by as much on that side.

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
ONS: tuple[tuple[str, ...], ...] = (("rejected",), ("review",), ("rejected", "review"))
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
    optimism: float = 0.0  # subtracted from the rate of the rows not sampled (selection_optimism); 0: not picked
    accepted_uncorrected: float | None = None  # `accepted` before that subtraction (None: nothing subtracted)
    interval_uncorrected: tuple[float, float] | None = None  # (`accepted_lo`, `accepted_hi`) before it

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
            "selection_optimism": round(self.optimism, 4),
            "accepted_uncorrected": None if self.accepted_uncorrected is None else round(self.accepted_uncorrected, 4),
            "accepted_interval_uncorrected": None
            if self.interval_uncorrected is None
            else [round(x, 4) for x in self.interval_uncorrected],
        }


def strategies(processors: Sequence[str], ons: Sequence[tuple[str, ...]] = ONS) -> list[Strategy]:
    """Every single processor, then every ordered subsequence of length >= 2 under each of `ons`.

    >>> [s.name for s in strategies(["lite", "core"])]
    ['lite', 'core', 'lite>core on rejected', 'lite>core on review', 'lite>core on rejected+review']
    """
    out = [Strategy((p,)) for p in processors]
    for n in range(2, len(processors) + 1):
        for ladder in itertools.combinations(processors, n):  # combinations keep the listed (climbing) order
            out += [Strategy(tuple(ladder), on) for on in ons]
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
    variance is the biased one). `forecast` uses it for the cost per row; for the accepted share, whose rows'
    variance a small sample near 100% underestimates, it uses `share_predictive`.

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


def share_predictive(values: Sequence[float], fields: int, rest: int, seed: int, count: int = BOOTSTRAP) -> list[float]:
    """Draws of what the accepted share over `rest` rows not sampled may be, from the sample's per-row shares
    `values` (accepted fields / `fields`): the Bayesian posterior predictive of a binomial share with Jeffreys'
    prior, on effective counts.

    The sample's accepted cells x of m = n * fields give the per-cell rate q the posterior Beta(x' + 1/2,
    m' - x' + 1/2), where x' = x / deff and m' = m / deff count cells the way independent ones would: `deff`
    (Kish's design effect, at least 1) is the rows' sample variance over the variance of a share of `fields`
    independent cells at the sample's rate, since a row's fields tend to pass or fail together (a ladder climbs
    for the whole row). Each draw is a rate q from that posterior plus the scatter of a share of rest * fields /
    deff cells at q (normal). Unlike a bootstrap of the rows' mean, whose spread is the sample's own variance, the
    spread here does not collapse when a sample near 0% or 100% happened to see few misses: the prior's half
    counts and the variance at each drawn q (larger towards the middle) keep it, as Jeffreys' interval for a
    proportion does (Brown, Cai & DasGupta 2001). On the emulator (S&P 500, 5 seeds, 200 random 50-row pilots
    each, tests/benchmarks/pilot_coverage.py), the bootstrap's 90% intervals of a strategy fixed in advance held
    the actual share in 88.6% of pilots (86.9-90.1% per seed), these in 90.8% (89.5-92.9%), 5% wider.

    >>> draws = share_predictive([1.0] * 50, 3, 450, 0, 1000)  # 150 cells, all accepted: not a certainty
    >>> round(quantile(draws, 0.05), 3), round(quantile(draws, 0.5), 3), max(draws) <= 1.0 + 1e-2
    (0.987, 0.999, True)
    """
    n = len(values)
    if n == 0:
        return []
    m = n * fields
    x = sum(values) * fields
    rate = x / m
    binomial = rate * (1 - rate) / fields  # a row's variance were its fields independent
    var = sum((v - rate) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    deff = max(1.0, var / binomial) if binomial > 0 else 1.0
    a, b = x / deff + 0.5, (m - x) / deff + 0.5
    left = rest * fields / deff
    rng = random.Random(seed * 7919 + 2)
    out = []
    for _ in range(count):
        q = rng.betavariate(a, b)
        out.append(q + (rng.gauss(0.0, math.sqrt(q * (1 - q) / left)) if left > 0 else 0.0))
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
    optimism: float = 0.0,
) -> Forecast:
    """One strategy over a file of `rows_total` inputs to research, of which the sample's rows are some (the full
    run pays only for the other `rows_total - len(sample)`, and the sampled ones keep their best answer across
    the ladder). The intervals cover what the sample does not know, the rate on the rows not sampled: the cost's
    from `boot` (resamples of the sample's rows; `resamples(len(sample), seed)` when not given, see `predictive`),
    the accepted share's from as many draws of `share_predictive`. `optimism` (see
    selection_optimism) is subtracted from that rate before the sampled rows are added back (their own answers
    are known, not forecast), and the interval becomes the union of the uncorrected one and the one shifted by
    the same amount: it widens by the correction on the side the correction moves to (downwards for a positive
    optimism), so it holds both the corrected and the uncorrected estimate."""
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
    acc_means = [min(1.0, max(0.0, x)) for x in share_predictive(acc, nf, rest, seed, len(boot))] or [_mean(acc)]
    mean_cost, mean_acc = _mean(cost), min(1.0, max(0.0, _mean(acc) - optimism))
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
        accepted_lo=whole(max(0.0, quantile(acc_means, INTERVAL[0]) - max(0.0, optimism))),
        accepted_hi=whole(min(1.0, quantile(acc_means, INTERVAL[1]) - min(0.0, optimism))),
        duration_s=duration_s({p: rest * s for p, s in reaching.items()}, lat, limits),
        climbs=reaching,
        optimism=optimism,
        accepted_uncorrected=whole(_mean(acc)) if optimism else None,
        interval_uncorrected=(whole(quantile(acc_means, INTERVAL[0])), whole(quantile(acc_means, INTERVAL[1])))
        if optimism
        else None,
    )


CHEAPEST, PER_DOLLAR, MOST = "cheapest meeting the target", "most accepted per dollar", "most accepted"


def choose(points: Sequence[tuple[float, float]], target: float) -> tuple[int, str]:
    """The recommendation rule on (expected accepted share, cost per row) pairs: the index and the rule that picked
    it. The cheapest whose share meets `target` (ties: the more accepted), else the most accepted share per dollar
    (a free strategy counts as best).

    >>> choose([(0.8, 0.01), (0.95, 0.03), (0.92, 0.02)], 0.9), choose([(0.8, 0.01), (0.85, 0.03)], 0.9)
    ((2, 'cheapest meeting the target'), (0, 'most accepted per dollar'))
    """
    if not points:
        raise ValueError("no strategies to choose from")
    meeting = [i for i, (a, _c) in enumerate(points) if a >= target]
    if meeting:
        return min(meeting, key=lambda i: (round(points[i][1], 9), -points[i][0])), CHEAPEST

    def per_dollar(i: int) -> float:
        a, c = points[i]
        return math.inf if c <= 0 else a / c

    return max(range(len(points)), key=lambda i: (per_dollar(i), points[i][0])), PER_DOLLAR


def most_accepted(points: Sequence[tuple[float, float]]) -> int:
    """The index of the most accepted share (ties: the cheaper).

    >>> most_accepted([(0.8, 0.01), (0.95, 0.03), (0.95, 0.02)])
    2
    """
    return max(range(len(points)), key=lambda i: (points[i][0], -round(points[i][1], 9)))


def recommend(forecasts: Sequence[Forecast], target: float) -> tuple[int, str]:
    """The index of the strategy to use and why, by `choose` on each forecast's accepted share and cost per row."""
    i, rule = choose([(f.accepted, f.cost_per_row_usd) for f in forecasts], target)
    if rule == CHEAPEST:
        return i, f"rule: the cheapest strategy expected to accept at least {target:.0%} of fields"
    return i, (
        f"fallback rule, as no strategy is expected to accept {target:.0%} of fields: "
        "the most accepted fields per dollar"
    )


def selection_optimism(
    sample: Sequence[Row],
    fields: Sequence[str],
    strats: Sequence[Strategy],
    prices: Mapping[str, int],
    *,
    rows_total: int,
    boot: list[list[int]],
    target: float,
) -> dict[str, dict[str, float]]:
    """Efron's bootstrap estimate of the optimism of a picked strategy's sample figures, for the recommendation rule
    (`choose`, key "recommended") and for the most accepted share (`most_accepted`, key "most_accepted").

    A strategy is picked because its sample looked good, so its sample share is, on average, above what it does on
    the rows not sampled. In each resample b of the sample's rows the same rule picks s_b from the resample's
    figures; its optimism there is s_b's accepted rate (per row, as `forecast` computes it) on the resample minus
    its rate on the whole sample, which plays the population's part. The mean over resamples estimates how much
    the picked strategy's sample rate flatters it; likewise for its cost per row (positive: the resample looked
    dearer). Returns {"recommended": {"accepted": ..., "cost_usd": ...}, "most_accepted": {...}}.
    """
    n, nf = len(sample), max(1, len(fields))
    zero = {"accepted": 0.0, "cost_usd": 0.0}
    if n == 0 or not boot or not strats:
        return {"recommended": dict(zero), "most_accepted": dict(zero)}
    rest = max(0, rows_total - n)
    acc, cost, kept = [], [], []
    for s in strats:
        outs = [replay(r, s, fields, prices) for r in sample]
        acc.append([o.accepted / nf for o in outs])
        cost.append([o.cost_micros / 1e6 for o in outs])
        kept.append([sum(1 for d in merged(r, s.ladder, fields).values() if d == "accepted") / nf for r in sample])
    rate = [sum(a) / n for a in acc]
    per_row = [sum(c) / n for c in cost]
    sums = {"recommended": [0.0, 0.0], "most_accepted": [0.0, 0.0]}
    for idx in boot:
        rate_b = [sum(a[i] for i in idx) / n for a in acc]
        cost_b = [sum(c[i] for i in idx) / n for c in cost]
        points = [((sum(k[i] for i in idx) + rest * rate_b[j]) / (rest + n), cost_b[j]) for j, k in enumerate(kept)]
        for key, j in (("recommended", choose(points, target)[0]), ("most_accepted", most_accepted(points))):
            sums[key][0] += rate_b[j] - rate[j]
            sums[key][1] += cost_b[j] - per_row[j]
    return {k: {"accepted": a / len(boot), "cost_usd": c / len(boot)} for k, (a, c) in sums.items()}


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
    ons: Sequence[tuple[str, ...]] = ONS,
) -> dict[str, Any]:
    """The pilot's findings (strategies under each of `ons`): the processor report, every strategy's forecast (one set of resamples for all, so
    they are compared on the same draws), the recommended strategy with its config snippet and the rule that
    picked it, and the strategy with the most accepted share beside it (a user may prefer it).

    The two picked strategies' accepted forecasts are corrected for the selection (`selection_optimism`): the
    recommended one's by the optimism of the recommendation rule, the most accepted one's (when it is another
    strategy) by the optimism of taking the maximum. The pick itself uses the uncorrected figures (the rule as the
    issue states it); cost is not corrected (its optimism is reported under "selection")."""
    boot = resamples(len(sample), seed)
    strats = strategies(processors, ons)

    def one(s: Strategy, optimism: float = 0.0) -> Forecast:
        return forecast(
            sample, fields, s, prices, rows_total=rows_total, limits=limits, seed=seed, boot=boot, optimism=optimism
        )

    fcs = [one(s) for s in strats]
    i, why = recommend(fcs, target)
    rule = choose([(f.accepted, f.cost_per_row_usd) for f in fcs], target)[1]
    m = most_accepted([(f.accepted, f.cost_per_row_usd) for f in fcs])
    opt = selection_optimism(sample, fields, strats, prices, rows_total=rows_total, boot=boot, target=target)
    if m != i:
        fcs[m] = one(strats[m], opt["most_accepted"]["accepted"])
    fcs[i] = one(strats[i], opt["recommended"]["accepted"])
    fcs[i].recommended = True

    def brief(f: Forecast) -> dict[str, Any]:
        d = f.as_dict()
        keep = ("name", "to_pay_usd", "to_pay_interval_usd", "accepted", "accepted_interval", "accepted_uncorrected")
        return {**{k: d[k] for k in keep}, "toml": toml_snippet(f.strategy)}

    return {
        "sample_rows": len(sample),
        "rows_total": rows_total,
        "fields": list(fields),
        "processors": processor_report(sample, fields, processors, prices),
        "strategies": [f.as_dict() for f in fcs],
        "target_accepted": target,
        "recommended": {**brief(fcs[i]), "why": why, "rule": rule},
        "most_accepted": brief(fcs[m]),
        "selection": {k: {q: round(x, 6) for q, x in v.items()} for k, v in opt.items()},
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
    rec, most = data["recommended"], data.get("most_accepted")
    lines += ["", f"recommended (*): {rec['name']}, {_picked(rec)}", f"  picked by the {rec['why']}"]
    if (raw := rec.get("accepted_uncorrected")) is not None:
        lines.append(
            f"  its accepted share is corrected for being picked on this sample: {raw:.1%} before, "
            f"{rec['accepted']:.1%} after (bootstrap selection optimism)"
        )
    lines += ["  paste into the config:", "", rec["toml"]]
    if most is not None and most["name"] != rec["name"]:
        # picked on the sample's figures, then corrected like the recommendation: it may now read below a strategy
        # it led on the sample, so say what it led with
        raw = most.get("accepted_uncorrected")
        led = (
            f" (the most on this sample: {raw:.1%}, before the correction for being picked)" if raw is not None else ""
        )
        lines += [
            "",
            f"most accepted share: {most['name']}, {_picked(most)}{led}; to use it instead:",
            "",
            most["toml"],
        ]
    elif most is not None:
        lines += ["", "it is also the strategy with the most accepted share"]
    return "\n".join(lines)


def _picked(s: Mapping[str, Any]) -> str:
    """`to pay $1.2000 [$1.0000-$1.4000], accepted 90% [85%-93%]` for a strategy of the findings."""
    lo, hi = s["to_pay_interval_usd"]
    alo, ahi = s["accepted_interval"]
    return (
        f"to pay ${s['to_pay_usd']:,.4f} [${lo:,.4f}-${hi:,.4f}], accepted {_pct(s['accepted'])} "
        f"[{_pct(alo)}-{_pct(ahi)}]"
    )


def _duration(s: float) -> str:
    """`_duration(42)` -> '42s', `_duration(4000)` -> '1.1h'."""
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"
