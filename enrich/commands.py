"""The bodies of the CLI's commands: each calls the library (job.py, scale/, init.py) and prints what it
returns; cli.py parses the flags, picks one of these and maps errors to exit codes.

Kept apart from cli.py because this is where the pipeline's imports begin (polars, pyarrow, httpx: about
a second of start-up): `enrich --help` and the re-run of a finished job (settled.py) never load it.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import os
import shlex
import sys
from pathlib import Path

from enrich import preflight
from enrich.calibrate import format_calibration
from enrich.errors import EXIT_INTERRUPTED, EXIT_OK, ConfigError
from enrich.flags import FLAGS, load, locate
from enrich.init import init_config
from enrich.job import (
    apply_review,
    calibrate_job,
    export,
    format_status,
    job_status,
    open_job,
    pilot_job,
    plan_job,
    run_job,
)
from enrich.pilot import format_pilot
from enrich.read import skip_pandas_probe
from enrich.report import run_lines
from enrich.reuse import cache_stats, format_cache_stats, prune_cache
from enrich.review_page.server import serve as serve_review
from enrich.scale import status as scaled
from enrich.scale.runner import run_partitioned


def _api_key(emulated: bool) -> str:
    return preflight.resolve_api_key(os.environ, emulated)


def cmd_plan(args: argparse.Namespace) -> int:
    print(plan_job(load(args), emulated=bool(args.emulator), retry_failed=args.retry_failed))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(args)
    cfg = load(args)
    emulated = bool(args.emulator)
    if args.ray is not None or args.partitions is not None:
        if args.ray is None:
            raise ConfigError("--partitions needs --ray")
        result = run_partitioned(
            cfg,
            address=args.ray or None,
            partitions=args.partitions,
            api_key=_api_key(emulated),
            emulated=emulated,
            retry_failed=args.retry_failed,
            adopt=args.adopt,
            fresh=args.fresh,
        )
    else:
        result = run_job(
            cfg,
            api_key=_api_key(emulated),
            emulated=emulated,
            retry_failed=args.retry_failed,
            adopt=args.adopt,
            fresh=args.fresh,
            detach=args.detach,
        )
    for line in run_lines(result.message, result.report):
        print(f"enrich: {line}", file=sys.stderr)
    if result.exit_code == EXIT_INTERRUPTED:
        cmd = " ".join(shlex.quote(a) for a in ["enrich", *sys.argv[1:]])
        print(f"enrich: Resume with: {cmd}", file=sys.stderr)
    return result.exit_code


def cmd_pilot(args: argparse.Namespace) -> int:
    cfg = load(args)
    emulated = bool(args.emulator)
    result = pilot_job(
        cfg,
        api_key=_api_key(emulated),
        emulated=emulated,
        rows=args.rows,
        processors=[p.strip() for p in args.processors.split(",") if p.strip()]
        if args.processors is not None
        else None,
        seed=args.seed,
        target=args.target_accepted,
        retry_failed=args.retry_failed,
        announce=lambda line: print(f"enrich: {line}", file=sys.stderr, flush=True),
    )
    if result.exit_code != EXIT_OK:
        print(f"enrich: {result.message}", file=sys.stderr)
        return result.exit_code
    print(json.dumps(result.data, indent=2) if args.json else format_pilot(result.data))
    print(f"enrich: pilot findings: {result.json_path}, {result.html_path}", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if (cut := scaled.partition_plan(args.job)) is not None:  # a partitioned job (--ray)
        info = scaled.status(args.job, cut)
        print(json.dumps(info, indent=2) if args.json else scaled.format_status(info))
        return EXIT_OK
    info = job_status(args.job, locate(args), FLAGS)
    print(json.dumps(info, indent=2) if args.json else format_status(info))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    cal, notes = calibrate_job(args.job, locate(args), FLAGS)
    for note in notes:
        print(f"enrich: {note}", file=sys.stderr)
    print(json.dumps(cal, indent=2) if args.json else format_calibration(cal))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    if not args.output and not args.basis:
        raise ConfigError("export: give --output FILE, --basis FILE, or both")
    job, journal, notes = open_job(args.job, locate(args, output=False), FLAGS, readonly=True, config=args.config)
    try:
        for note in notes:
            print(f"enrich: {note}", file=sys.stderr)
        done = export(
            job, journal, Path(args.output) if args.output else None, Path(args.basis) if args.basis else None
        )
    finally:
        journal.close()
    if "rows" in done:
        print(f"enrich: exported {done['rows']} rows to {args.output}", file=sys.stderr)
    if "basis_lines" in done:
        print(f"enrich: exported {done['basis_lines']} evidence lines to {args.basis}", file=sys.stderr)
    return EXIT_OK


def cmd_review(args: argparse.Namespace) -> int:
    if args.action == "serve":
        return serve_review(
            args.job,
            locate(args),
            FLAGS,
            host=args.host,
            port=args.port,
            reviewer=args.reviewer if args.reviewer is not None else _user(),
            browser=not args.no_browser,
        )
    job, journal, notes = open_job(args.job, locate(args), FLAGS)
    try:
        for note in notes:
            print(f"enrich: {note}", file=sys.stderr)
        n, report = apply_review(job, journal, Path(args.reviewed))
    finally:
        journal.close()
    print(f"enrich: applied {n} verdicts; rewrote {report['output']} ({report['rows']} rows)", file=sys.stderr)
    if report.get("review_file"):
        print(f"enrich: {report['review_lines']} lines left to review in {report['review_file']}", file=sys.stderr)
    return EXIT_OK


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container): verdicts are recorded without one
        return ""


def cmd_emulator(args: argparse.Namespace) -> int:
    from enrich.emulator import EmulatorConfig, EmulatorServer
    from enrich.emulator.behaviours import parse_behaviours
    from enrich.emulator.core import parse_faults

    try:
        parse_faults(args.faults)
    except ValueError as exc:
        raise ConfigError(f"--faults: {exc}") from None
    try:
        parse_behaviours(args.behaviours)
    except ValueError as exc:
        raise ConfigError(f"--behaviours: {exc}") from None
    if not 0 <= args.hard_rate <= 1:
        raise ConfigError("--hard-rate must be within 0..1")
    preflight.check_knowledge(args.knowledge, args.knowledge_key, where="--knowledge")
    cfg = EmulatorConfig(
        knowledge=args.knowledge,
        knowledge_key=args.knowledge_key,
        time_scale=args.time_scale,
        seed=args.seed,
        fail_rate=args.fail_rate,
        rate_limit=args.rate_limit,
        credit_usd=args.credit_usd,
        faults=args.faults,
        api_key=args.api_key,
        behaviours=args.behaviours,
        hard_rate=args.hard_rate,
    )
    try:
        server = EmulatorServer(cfg, host=args.host, port=args.port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    server.serve_forever()
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    if args.action == "prune":
        if not args.older_than:
            raise ConfigError("cache prune: give --older-than AGE (e.g. 90d)")
        removed, path = prune_cache(args.path, args.older_than)
        print(f"enrich: removed {removed:,} entries older than {args.older_than} from {path}", file=sys.stderr)
        return EXIT_OK
    info = cache_stats(args.path)
    print(json.dumps(info, indent=2) if args.json else format_cache_stats(info))
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    path, commands = init_config(args.data, args.config)
    print(f"wrote {path}; try next:")
    for c in commands:
        print(f"  {c}")
    return EXIT_OK


COMMANDS = {
    "init": cmd_init,
    "run": cmd_run,
    "plan": cmd_plan,
    "pilot": cmd_pilot,
    "status": cmd_status,
    "export": cmd_export,
    "calibrate": cmd_calibrate,
    "review": cmd_review,
    "emulator": cmd_emulator,
    "cache": cmd_cache,
}


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit code (errors propagate to cli.py, which maps them)."""
    skip_pandas_probe()  # before the first Arrow conversion of this process
    gc.freeze()  # the modules just imported live as long as the process: no collection needs to scan them
    return COMMANDS[args.command](args)
