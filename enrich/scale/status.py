"""`enrich status` and `enrich plan` for a partitioned job: totals and one line per partition.

A job is partitioned when `<journal>.parts/job.json` exists (or, for `plan`, when its input is
a directory or a glob). Everything here reads the partition journals read-only and makes no
API call and no Ray call, so it works while the job runs and on any node that sees the files.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from enrich.config import RunConfig, build_task_spec, output_fields
from enrich.decide import escalate_pass
from enrich.errors import JournalError
from enrich.journal import IN_FLIGHT, ROW_STATES, Journal
from enrich.pipeline import steps_line
from enrich.processors import PROCESSORS
from enrich.scale.partition import PartitionPlan, _count_and_check, _pieces, load_plan, parts_dir_for, resolve_inputs
from enrich.spend import runs_within
from enrich.storage import mode_of, one_mode


def partition_plan(journal: str | Path) -> PartitionPlan | None:
    """The plan of the partitioned job whose journal is `journal`, or None when it is not one."""
    return load_plan(parts_dir_for(Path(journal)))


def _journal_info(path: Path, rows: int, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Counts, spend and last error of one partition journal (a partition not started: all pending); with
    `cfg`, pending rows per processor, finished rows that will climb the ladder counted as pending there."""
    if not path.is_file():
        return {"started": False, "counts": {"pending": rows}, "spent_micros": 0, "last_error": None}
    try:
        view = Journal.open(path, readonly=True)
    except JournalError as exc:
        return {"started": True, "counts": {}, "spent_micros": 0, "last_error": str(exc)}
    try:
        epoch = view.get("epoch", 0)
        info = {
            "started": True,
            "counts": view.counts(epoch),
            "spent_micros": view.spent_micros(),
            "last_error": view.last_error(),
            "emulated": view.get("emulated"),
            "journal_mode": mode_of(view.sqlite_mode()),
        }
        if cfg is not None:
            info["pending"] = view.pending_by_processor(epoch)
            climbs: Counter[str] = Counter()
            if len(cfg.ladder) > 1:  # finished rows the partition's next run climbs first (pipeline.execute)
                escalate_pass(view, cfg, epoch, list(output_fields(build_task_spec(cfg))), dry=True, targets=climbs)
            info["climbs"] = dict(climbs)
        return info
    finally:
        view.close()


def status(journal: str | Path, plan: PartitionPlan) -> dict[str, Any]:
    """Totals over the partitions and each partition's own counts (`enrich status JOURNAL`)."""
    total: dict[str, int] = {}
    per = []
    for p in plan.partitions:
        info = _journal_info(plan.journal(p), p.rows)
        for k, v in info["counts"].items():
            total[k] = total.get(k, 0) + v
        finished = plan.marker(p).is_file()
        per.append(
            {
                "partition": p.index,
                "rows": p.rows,
                "counts": info["counts"],
                "started": info["started"],
                "finished": finished,
                "spent_usd": info["spent_micros"] / 1e6,
                "last_error": info["last_error"],
                "in_flight": sum(info["counts"].get(s, 0) for s in IN_FLIGHT),
                "journal_mode": info.get("journal_mode"),
            }
        )
    errors = [e["last_error"] for e in per if e["last_error"]]

    return {
        "journal": str(journal),
        "partitioned": True,
        "partitions": len(plan.partitions),
        "rows": plan.rows,
        "counts": total,
        "in_flight": sum(total.get(s, 0) for s in IN_FLIGHT),
        "spent_usd": sum(e["spent_usd"] for e in per),
        "last_error": errors[-1] if errors else None,
        "journal_mode": one_mode([e["journal_mode"] for e in per]),
        "per_partition": per,
    }


def format_status(info: dict[str, Any]) -> str:
    lines = [
        f"journal      {info['journal']}  (partitioned: {info['partitions']} partitions)",
        f"rows         {info['rows']:,}",
    ]
    lines += [f"  {s:<10} {info['counts'][s]:,}" for s in ROW_STATES if info["counts"].get(s)]
    lines += [
        f"in flight    {info['in_flight']:,}",
        f"spent        ${info['spent_usd']:,.4f}",
        f"last error   {info['last_error'] or '-'}",
        f"journal mode {info.get('journal_mode') or '-'}  (partition journals: local = WAL, network = rollback journal)",
        "",
        "partition     rows      done   pending  in flight    spent  state",
    ]
    for e in info["per_partition"]:
        c = e["counts"]
        state = "finished" if e["finished"] else "running/resumable" if e["started"] else "not started"
        lines.append(
            f"part-{e['partition']:05d} {e['rows']:>8,} {c.get('done', 0):>9,} {c.get('pending', 0):>9,} "
            f"{e['in_flight']:>10,} {e['spent_usd']:>8.4f}  {state}"
        )
    return "\n".join(lines)


def plan(cfg: RunConfig, journal: Path) -> dict[str, Any] | None:
    """`enrich plan` for a partitioned job (cut already, or an input directory/glob): None when not one.

    Rows to submit come from the partition journals (a partition not started: all its rows). The
    duration band uses the job-wide in-flight limit and POST rate, which the partitions share."""
    cut = load_plan(parts_dir_for(journal))
    steps: dict[str, int] = {}  # escalation steps pending, over all partitions
    if cut is None:
        if cfg.input.path.is_file():
            return None
        files = resolve_inputs(cfg.input.path)
        _header, counts = _count_and_check(cfg, files)
        per: list[dict[str, Any]] = [
            {"partition": None, "rows": n, "done": 0, "to_submit": n, "in_flight": 0, "spent_usd": 0.0} for n in counts
        ]
        n_parts = sum(_pieces(counts, None))
    else:
        per = []
        for p in cut.partitions:
            info = _journal_info(cut.journal(p), p.rows, cfg)
            c = info["counts"]
            pending = info.get("pending", {cfg.task.processor: c.get("pending", 0)})
            waiting = {
                k: n for k, n in pending.items() if k in cfg.ladder[1:]
            }  # a row waiting for a step has an answer
            mine = Counter(waiting) + Counter(info.get("climbs", {}))
            for proc_name, n in mine.items():
                steps[proc_name] = steps.get(proc_name, 0) + n
            per.append(
                {
                    "partition": p.index,
                    "rows": p.rows,
                    "done": c.get("done", 0) + sum(waiting.values()),
                    "to_submit": pending.get(cfg.task.processor, 0),
                    "escalation_steps": sum(mine.values()),
                    "in_flight": sum(c.get(s, 0) for s in IN_FLIGHT),
                    "spent_usd": info["spent_micros"] / 1e6,
                }
            )
        n_parts = len(cut.partitions)
    proc = PROCESSORS[cfg.task.processor]
    to_submit = sum(e["to_submit"] for e in per)
    runs = to_submit + sum(steps.values())
    in_flight = sum(e["in_flight"] for e in per)
    spent = sum(e["spent_usd"] for e in per)
    lo, hi = proc.latency_s
    waves = math.ceil((runs + in_flight) / cfg.limits.max_in_flight) if runs + in_flight else 0
    pacing = math.ceil(runs / cfg.limits.batch_size) * 60.0 / cfg.limits.requests_per_minute
    budget = cfg.limits.budget_usd
    by_price: dict[int, int] = {proc.price_micros: to_submit}
    for name, n in steps.items():
        by_price[PROCESSORS[name].price_micros] = by_price.get(PROCESSORS[name].price_micros, 0) + n
    cost = sum(price * n for price, n in by_price.items())
    return {
        "partitions": n_parts,
        "rows": sum(e["rows"] for e in per),
        "done": sum(e["done"] for e in per),
        "in_flight": in_flight,
        "to_submit": to_submit,
        "escalation_steps": {p: steps[p] for p in cfg.ladder if p in steps},
        "processor": proc.name,
        "estimated_cost_usd": round(cost / 1e6, 6),
        "spent_so_far_usd": round(spent, 6),
        "budget_usd": budget,
        "runs_to_submit": runs,
        "runs_within_budget": runs_within(None if budget is None else round((budget - spent) * 1e6), by_price),
        "duration_s": [round(max(waves * lo, pacing), 1), round(waves * hi + pacing, 1)] if waves else [0, 0],
        "per_partition": per if cut is not None else [],
        **(
            {  # every row still to run (or in flight) paying every rung above the first: the upper bound
                "ladder": cfg.ladder,
                "ladder_worst_case_usd": round(
                    (
                        to_submit * proc.price_micros
                        + (to_submit + in_flight) * sum(PROCESSORS[p].price_micros for p in cfg.ladder[1:])
                    )
                    / 1e6,
                    6,
                ),
            }
            if len(cfg.ladder) > 1
            else {}
        ),
    }


def format_plan(info: dict[str, Any]) -> str:
    lines = [
        f"partitions           {info['partitions']:,}" + ("" if info["per_partition"] else "  (not cut yet)"),
        f"rows in input        {info['rows']:,}",
        f"already done         {info['done']:,}",
        f"in flight            {info['in_flight']:,}",
        f"to submit            {info['to_submit']:,}  x {info['processor']}",
    ]
    if steps := info.get("escalation_steps"):
        lines.append(steps_line(steps))
    lines.append(
        f"estimated cost       ${info['estimated_cost_usd']:,.2f}  (spent so far ${info['spent_so_far_usd']:,.2f})"
    )
    if info["budget_usd"] is not None:
        lines.append(
            f"budget               ${info['budget_usd']:,.2f}  (room for {info['runs_within_budget']:,} of the "
            f"{info['runs_to_submit']:,} runs to submit, first tier first, shared by all partitions)"
        )
    lo, hi = info["duration_s"]
    lines.append(f"expected duration    {lo:.0f}s - {hi:.0f}s")
    if info["per_partition"]:
        lines.append("")
        lines.append("partition     rows      done  to submit  esc. steps  in flight")
        for e in info["per_partition"]:
            lines.append(
                f"part-{e['partition']:05d} {e['rows']:>8,} {e['done']:>9,} {e['to_submit']:>10,} "
                f"{e.get('escalation_steps', 0):>11,} {e['in_flight']:>10,}"
            )
    return "\n".join(lines)
