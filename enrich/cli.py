"""The `enrich` command: a thin layer mapping flags to the library and errors to exit codes.

Exit codes: 0 all rows completed · 2 usage/config/input error · 3 finished with failed,
timed-out or unknown rows · 4 budget exhausted · 5 auth or payment error (401/402/403) ·
75 interrupted (resumable: run the same command again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from enrich import __version__, failpoints, preflight
from enrich.config import DEFAULT_BASE_URL, RunConfig, load_config
from enrich.errors import AuthError, ConfigError, EnrichError, JournalError, PaymentRequired, redact

EXIT_OK, EXIT_USAGE, EXIT_FAILED_ROWS, EXIT_BUDGET, EXIT_AUTH, EXIT_INTERRUPTED = 0, 2, 3, 4, 5, 75


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the same single line every other error uses (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"enrich: error: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="enrich", description="Turn a spreadsheet into a researched one with "
                                "Parallel's Task API: resumable, budgeted, with evidence per field.")
    p.add_argument("--version", action="version", version=f"enrich {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="job config (TOML)")
        sp.add_argument("--input", help="input CSV/Parquet (overrides input.path)")
        sp.add_argument("--output", help="output CSV/Parquet (overrides output.path)")
        sp.add_argument("--journal", help="journal file (default: beside the output)")
        sp.add_argument("--processor", help="processor, e.g. lite-fast, base, core (overrides task.processor)")
        sp.add_argument("--budget", type=preflight.finite_nonneg, metavar="USD", help="spend cap for this journal, in USD")
        sp.add_argument("--max-in-flight", type=preflight.positive_int, metavar="N", help="runs submitted but not finished")
        sp.add_argument("--base-url", help="API base URL (default: config, $PARALLEL_BASE_URL, "
                        f"{DEFAULT_BASE_URL})")
        sp.add_argument("--emulator", action="store_true", help="run against the bundled emulator (no key, "
                        "no cost; outputs are marked as emulated)")
        sp.add_argument("--retry-failed", action="store_true", help="research failed and timed-out rows again")

    run = sub.add_parser("run", help="enrich the input (continues an interrupted job)")
    job_flags(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit (no API calls)")
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
    em.add_argument("--port", type=preflight.port, default=8765)
    em.add_argument("--knowledge", help="CSV/Parquet knowledge table (default: bundled companies)")
    em.add_argument("--knowledge-key", default="company", help="column matched against run inputs")
    em.add_argument("--time-scale", type=preflight.finite_nonneg, default=1.0, help="latency multiplier (0 = instant)")
    em.add_argument("--seed", type=int, default=0)
    em.add_argument("--fail-rate", type=preflight.fraction, default=0.0, help="share of runs that fail")
    em.add_argument("--rate-limit", type=preflight.nonneg_int, default=2000, help="creating POSTs per minute per key (0 = off)")
    em.add_argument("--credit-usd", type=preflight.finite_nonneg, help="account credit; 402 when it cannot cover new runs")
    em.add_argument("--faults", default="", help='e.g. "429=0.05,500=0.02,503=0.01,drop=0.02,slow=0.01,truncate=0.01"')
    em.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    return p


# config key -> the flag that overrides it, so a bad value is reported under the flag's name
_FLAGS = {"input.path": "--input", "output.path": "--output", "journal": "--journal", "task.processor": "--processor",
          "limits.budget_usd": "--budget", "limits.max_in_flight": "--max-in-flight", "api.base_url": "--base-url"}


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, _overrides(args), flags=_FLAGS)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"input.path": args.input, "output.path": args.output, "journal": args.journal,
            "task.processor": args.processor, "limits.budget_usd": args.budget,
            "limits.max_in_flight": args.max_in_flight, "api.base_url": args.base_url}


def _api_key(emulated: bool) -> str:
    return preflight.resolve_api_key(os.environ, emulated)


def _base_url(cfg: RunConfig) -> str:
    return cfg.api.base_url or os.environ.get("PARALLEL_BASE_URL") or DEFAULT_BASE_URL


def cmd_plan(args: argparse.Namespace) -> int:
    from enrich.journal import Journal
    from enrich.pipeline import format_plan, plan_summary, prepare

    cfg = _load(args)
    preflight.check_job(cfg, api_key=None, emulated=bool(args.emulator))
    path = cfg.journal_path
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
    from enrich.client import TaskClient
    from enrich.journal import Journal
    from enrich.pipeline import execute, prepare
    from enrich.progress import JobState
    from enrich.write import write_output

    cpu0 = time.process_time()
    cfg = _load(args)
    emulated = bool(args.emulator)
    key = _api_key(emulated)
    preflight.check_job(cfg, api_key=key, emulated=emulated)
    journal = Journal.open(cfg.journal_path)
    server = None
    try:
        mode = journal.get("emulated")
        if mode is not None and mode != emulated and journal.get("taskgroup_id"):
            raise JournalError(f"{cfg.journal_path}: this journal holds {'emulated' if mode else 'real'} results; "
                               f"use another --journal for {'emulated' if emulated else 'real'} runs")
        prep = prepare(cfg, journal, retry_failed=args.retry_failed)
        journal.set("emulated", emulated)
        journal.set("config", {"path": str(cfg.source), "output": str(cfg.output.path), "reasoning": cfg.output.reasoning,
                               "formula_guard": cfg.output.formula_guard, "task_spec": prep.task_spec})
        if emulated:
            from enrich.emulator import EmulatorConfig, EmulatorServer

            e = cfg.emulator
            server = EmulatorServer(EmulatorConfig(
                knowledge=str(e.knowledge) if e.knowledge else None, knowledge_key=e.knowledge_key,
                time_scale=e.time_scale, seed=e.seed, fail_rate=e.fail_rate, rate_limit=e.rate_limit,
                faults=e.faults)).start()
            base_url = server.base_url
        else:
            base_url = _base_url(cfg)

        async def on_response(response: Any) -> None:
            if response.request.method == "POST" and response.request.url.path.endswith("/runs"):
                failpoints.hit("after_send_before_response")

        state = JobState()
        interrupted = False

        async def main() -> Any:
            nonlocal interrupted
            loop = asyncio.get_running_loop()

            def stop() -> None:
                nonlocal interrupted
                if interrupted:   # a second Ctrl-C: leave now; every commit already made is durable
                    print("enrich: interrupted again; exiting at once (the journal is intact)", file=sys.stderr)
                    os._exit(EXIT_INTERRUPTED)
                interrupted = True
                print("enrich: stopping (Ctrl-C again to leave at once)...", file=sys.stderr)
                state.stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop)
            client = TaskClient(base_url, key, timeout_s=cfg.limits.request_timeout_s, on_response=on_response)
            try:
                return await execute(cfg, journal, client, prep, emulated=emulated, state=state)
            finally:
                await client.aclose()

        asyncio.run(main())
        counts = journal.counts(prep.epoch)
        report = write_output(journal, cfg.output.path, prep.fields, reasoning=cfg.output.reasoning,
                              formula_guard=cfg.output.formula_guard, emulated=emulated,
                              budget_exhausted=state.budget_exhausted,
                              extra={"processor": cfg.task.processor, "journal": str(cfg.journal_path),
                                     "interrupted": interrupted, "runs_created_this_invocation": state.submitted,
                                     "http_requests_this_invocation": state.requests,
                                     "elapsed_s": round(time.monotonic() - state.started, 3),
                                     "cpu_s": round(time.process_time() - cpu0, 3)})
        sc = report["status_counts"]
        print(f"enrich: wrote {report['rows']} rows to {cfg.output.path} "
              f"({', '.join(f'{v} {k}' for k, v in sorted(sc.items()))}); spent ${report['spend_usd']:.4f}"
              f"{' [EMULATED]' if emulated else ''}", file=sys.stderr)
        if isinstance(state.fatal, AuthError | PaymentRequired):
            print(f"enrich: stopped: {redact(str(state.fatal), key)}", file=sys.stderr)
            return EXIT_AUTH
        if state.fatal is not None:
            print(f"enrich: stopped: {redact(str(state.fatal), key)}", file=sys.stderr)
            return EXIT_FAILED_ROWS
        if interrupted:
            cmd = " ".join(shlex.quote(a) for a in ["enrich", *sys.argv[1:]])
            print(f"enrich: interrupted; progress is saved in {cfg.journal_path}. Resume with: {cmd}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if counts.get("pending", 0) and state.budget_exhausted:
            print(f"enrich: budget exhausted: {counts['pending']} rows skipped (skipped_budget); raise --budget "
                  "and run again to finish them", file=sys.stderr)
            return EXIT_BUDGET
        if any(counts.get(s, 0) for s in ("failed", "timed_out", "unknown", "intent", "pending", "submitted")):
            return EXIT_FAILED_ROWS
        return EXIT_OK
    finally:
        if server is not None:
            server.stop()
        journal.close()


def cmd_status(args: argparse.Namespace) -> int:
    from enrich.journal import Journal

    preflight.check_journal_file(args.journal)
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

    preflight.check_journal_file(args.journal)
    journal = Journal.open(args.journal, readonly=True)
    try:
        recorded = journal.get("config") or {}
        if "task_spec" not in recorded:
            raise JournalError(f"{args.journal}: journal has no recorded task spec; run the job first")
        out = Path(args.output)
        preflight.check_output_path(out, input_path=journal.get("input_path"), journal_path=args.journal,
                                    flag="--output")
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
    preflight.check_knowledge(args.knowledge, args.knowledge_key, where="--knowledge")
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
        code = COMMANDS[args.command](args)
        sys.stdout.flush()   # a closed pipe (`enrich plan | head -1`) surfaces here, not at exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away: say nothing more, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK if args.command in ("plan", "status") else EXIT_INTERRUPTED
    except EnrichError as exc:
        print(f"enrich: error: {redact(str(exc), secret)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("enrich: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
