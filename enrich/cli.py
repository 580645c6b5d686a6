"""The `enrich` command: a thin layer mapping flags to the library and errors to exit codes.

Exit codes (job.EXIT_CODES): 0 all rows completed · 2 usage/config/input error · 3 finished
with failed, timed-out or unknown rows · 4 budget exhausted · 5 auth or payment error
(401/402/403) · 69 API unreachable (resumable) · 75 interrupted (resumable: run the same
command again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import stat
import sys
from pathlib import Path
from typing import Any

from enrich import __version__
from enrich.config import DEFAULT_BASE_URL, load_config
from enrich.errors import ConfigError, EnrichError, JournalError, redact
from enrich.job import EXIT_INTERRUPTED, EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enrich", description="Turn a spreadsheet into a researched one with "
                                "Parallel's Task API: resumable, budgeted, with evidence per field.")
    p.add_argument("--version", action="version", version=f"enrich {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="job config (TOML)")
        sp.add_argument("--input", help="input CSV/Parquet (overrides input.path)")
        sp.add_argument("--output", help="output CSV/Parquet (overrides output.path)")
        sp.add_argument("--journal", help="journal file (default: beside the output)")
        sp.add_argument("--processor", help="processor, e.g. lite-fast, base, core (overrides task.processor)")
        sp.add_argument("--budget", type=float, metavar="USD", help="spend cap for this journal, in USD")
        sp.add_argument("--max-in-flight", type=int, metavar="N", help="runs submitted but not finished")
        sp.add_argument("--base-url", help="API base URL (default: config, $PARALLEL_BASE_URL, "
                        f"{DEFAULT_BASE_URL})")
        sp.add_argument("--emulator", action="store_true", help="run against the bundled emulator (no key, "
                        "no cost; outputs are marked as emulated)")
        sp.add_argument("--retry-failed", action="store_true", help="research failed and timed-out rows again")

    run = sub.add_parser("run", help="enrich the input (continues an interrupted job)")
    job_flags(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit (no API calls)")
    run.add_argument("--adopt", action="store_true", help="take over a journal recorded for another job "
                     "(different output, task spec, key columns or API key)")
    run.add_argument("--fresh", action="store_true", help="start over: delete the journal (its results are lost; "
                     "rows are paid for again)")
    run.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run as partitions on Ray: no ADDRESS "
                     "starts a local Ray, `auto` or ray://HOST:PORT joins a cluster (see README, Scaling out)")
    run.add_argument("--partitions", type=int, metavar="N", help="with --ray: partitions to cut the input into "
                     "(default: one per 50,000 rows; an input directory: at least one per file)")
    plan = sub.add_parser("plan", help="rows, cost and duration estimate; no API calls")
    job_flags(plan)
    st = sub.add_parser("status", help="counts by state, spend, last error (works while a run is live)")
    st.add_argument("journal")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ex = sub.add_parser("export", help="rewrite the output from the journal alone (no API calls)")
    ex.add_argument("journal")
    ex.add_argument("--output", required=True)
    ex.add_argument("--config", help="job config, for the output fields (default: the one recorded)")
    em = sub.add_parser("emulator", help="serve the API-compatible emulator on loopback")
    em.add_argument("--host", default="127.0.0.1")
    em.add_argument("--port", type=int, default=8765)
    em.add_argument("--knowledge", help="CSV/Parquet knowledge table (default: bundled companies)")
    em.add_argument("--knowledge-key", default="company", help="column matched against run inputs")
    em.add_argument("--time-scale", type=float, default=1.0, help="latency multiplier (0 = instant)")
    em.add_argument("--seed", type=int, default=0)
    em.add_argument("--fail-rate", type=float, default=0.0, help="share of runs that fail")
    em.add_argument("--rate-limit", type=int, default=2000, help="creating POSTs per minute per key (0 = off)")
    em.add_argument("--credit-usd", type=float, help="account credit; 402 when it cannot cover new runs")
    em.add_argument("--faults", default="", help='e.g. "429=0.05,500=0.02,503=0.01,drop=0.02,slow=0.01,truncate=0.01"')
    em.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"input.path": args.input, "output.path": args.output, "journal": args.journal,
            "task.processor": args.processor, "limits.budget_usd": args.budget,
            "limits.max_in_flight": args.max_in_flight, "api.base_url": args.base_url}


def _api_key(emulated: bool) -> str:
    if emulated:
        return "emulator-local-key"
    key = os.environ.get("PARALLEL_API_KEY", "").strip()
    key_file = os.environ.get("PARALLEL_API_KEY_FILE")
    if not key and key_file:
        mode = os.stat(key_file).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{key_file}: key file must be readable by its owner only (chmod 600)")
        key = Path(key_file).read_text().strip()
    if not key:
        raise ConfigError("PARALLEL_API_KEY is not set; export it, or add --emulator to run against the "
                          "bundled emulator (no key, no cost)")
    return key


def cmd_plan(args: argparse.Namespace) -> int:
    from enrich.job import check_paths, journal_path_for
    from enrich.journal import Journal
    from enrich.pipeline import format_plan, plan_summary, prepare

    cfg = load_config(args.config, _overrides(args))
    path = journal_path_for(cfg)
    check_paths(cfg, path)
    from enrich.scale import status as scaled

    if (info := scaled.plan(cfg, path)) is not None:   # a partitioned job (--ray)
        print(scaled.format_plan(info))
        return EXIT_OK
    journal = Journal.open(path, readonly=False) if path.exists() else Journal.open(":memory:")
    try:
        prep = prepare(cfg, journal, retry_failed=args.retry_failed, dry=True)
        print(format_plan(plan_summary(cfg, prep, journal)))
    finally:
        journal.close()
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(args)
    from enrich.job import run_job

    cfg = load_config(args.config, _overrides(args))
    emulated = bool(args.emulator)
    if args.ray is not None or args.partitions is not None:
        if args.ray is None:
            raise ConfigError("--partitions needs --ray")
        from enrich.scale.runner import run_partitioned

        result = run_partitioned(cfg, address=args.ray or None, partitions=args.partitions,
                                 api_key=_api_key(emulated), emulated=emulated, retry_failed=args.retry_failed,
                                 adopt=args.adopt, fresh=args.fresh)
    else:
        result = run_job(cfg, api_key=_api_key(emulated), emulated=emulated, retry_failed=args.retry_failed,
                         adopt=args.adopt, fresh=args.fresh)
    for line in result.message.splitlines():
        print(f"enrich: {line}", file=sys.stderr)
    if result.exit_code == EXIT_INTERRUPTED:
        cmd = " ".join(shlex.quote(a) for a in ["enrich", *sys.argv[1:]])
        print(f"enrich: Resume with: {cmd}", file=sys.stderr)
    return result.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from enrich.journal import Journal
    from enrich.scale import status as scaled

    if (cut := scaled.partition_plan(args.journal)) is not None:   # a partitioned job (--ray)
        info = scaled.status(args.journal, cut)
        print(json.dumps(info, indent=2) if args.json else scaled.format_status(info))
        return EXIT_OK
    journal = Journal.open(args.journal, readonly=True)
    try:
        epoch = journal.get("epoch", 0)
        counts = journal.counts(epoch)
        info = {"journal": args.journal, "rows": sum(counts.values()), "counts": counts,
                "in_flight": sum(counts.get(s, 0) for s in ("intent", "unknown", "submitted")),
                "spent_usd": journal.spent_micros() / 1e6, "taskgroup_id": journal.get("taskgroup_id"),
                "emulated": journal.get("emulated"), "last_error": journal.last_error()}
    finally:
        journal.close()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"journal      {info['journal']}{'  [EMULATED]' if info['emulated'] else ''}")
        print(f"rows         {info['rows']:,}")
        for state_name in ("done", "failed", "timed_out", "pending", "intent", "unknown", "submitted"):
            if counts.get(state_name):
                print(f"  {state_name:<10} {counts[state_name]:,}")
        print(f"in flight    {info['in_flight']:,}")
        print(f"spent        ${info['spent_usd']:,.4f}")
        print(f"last error   {info['last_error'] or '-'}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from enrich.config import output_fields
    from enrich.journal import Journal
    from enrich.write import write_output

    journal = Journal.open(args.journal, readonly=True)
    try:
        recorded = journal.get("config") or {}
        if "task_spec" not in recorded:
            raise JournalError(f"{args.journal}: journal has no recorded task spec; run the job first")
        out = Path(args.output)
        if out.resolve() == Path(args.journal).resolve():
            raise ConfigError("output path is the journal file")
        report = write_output(journal, out, output_fields(recorded["task_spec"]),
                              reasoning=bool(recorded.get("reasoning")),
                              formula_guard=recorded.get("formula_guard", True),
                              emulated=bool(journal.get("emulated")), budget_exhausted=False,
                              extra={"exported_from": args.journal})
    finally:
        journal.close()
    print(f"enrich: exported {report['rows']} rows to {out}", file=sys.stderr)
    return EXIT_OK


def cmd_emulator(args: argparse.Namespace) -> int:
    from enrich.emulator import EmulatorConfig, EmulatorServer
    from enrich.emulator.core import parse_faults

    try:
        parse_faults(args.faults)
    except ValueError as exc:
        raise ConfigError(f"--faults: {exc}") from None
    cfg = EmulatorConfig(knowledge=args.knowledge, knowledge_key=args.knowledge_key, time_scale=args.time_scale,
                         seed=args.seed, fail_rate=args.fail_rate, rate_limit=args.rate_limit,
                         credit_usd=args.credit_usd, faults=args.faults, api_key=args.api_key)
    try:
        server = EmulatorServer(cfg, host=args.host, port=args.port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    server.serve_forever()
    return EXIT_OK


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "export": cmd_export, "emulator": cmd_emulator}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    secret = os.environ.get("PARALLEL_API_KEY")
    try:
        return COMMANDS[args.command](args)
    except EnrichError as exc:
        print(f"enrich: error: {redact(str(exc), secret)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("enrich: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
