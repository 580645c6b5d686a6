"""The `enrich` command: a thin layer mapping flags to the library and errors to exit codes.

Exit codes (job.EXIT_CODES): 0 all rows completed · 2 usage/config/input error · 3 finished
with failed, timed-out, action_required or unknown rows · 4 budget exhausted · 5 auth or payment error
(401/402/403) · 69 API unreachable (resumable) · 74 disk full or failing under the journal
or output (resumable) · 75 interrupted (resumable: run the same command again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Any, NoReturn

from enrich import __version__, settled
from enrich.config import DEFAULT_BASE_URL, EMULATOR_KEY
from enrich.errors import (
    DISK_ERRNOS,
    EXIT_DISK,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EnrichError,
    disk_message,
    redact,
)
from enrich.flags import finite_nonneg, fraction, load, nonneg_int, port, positive_int

EXIT_CODES_HELP = (
    "exit codes: 0 all rows completed, 2 usage/config/input error, 3 finished with failed rows, "
    "4 budget exhausted, 5 auth or payment error, 69 API unreachable (resumable), 70 internal error, "
    "74 disk full (free space, run again), 75 interrupted (run the same command again)"
)
_EPILOGS = {
    "run": "example:\n  enrich run configs/companies.toml --emulator\n\n" + EXIT_CODES_HELP,
    "pilot": "example:\n  enrich pilot configs/companies.toml --emulator --rows 50 --processors lite,base,core\n\n"
    "exit codes: 0 findings written (nothing in the config is changed), 2 usage/config error or the pilot's worst "
    "case exceeds the budget (nothing sent), 4 budget exhausted, 5 auth or payment error, 69 API unreachable, "
    "75 interrupted (run the same command again: nothing is paid twice)",
    "plan": "example:\n  enrich plan configs/companies.toml --processor core\n\n"
    "exit codes: 0 plan printed, 2 usage/config/input error",
    "status": "example:\n  enrich status out/companies.enriched.parquet.journal.sqlite --json\n\n"
    "exit codes: 0 status printed, 2 no such journal or unreadable",
    "review": "examples:\n  enrich review apply configs/companies.toml out/companies.enriched.review.csv\n"
    "  enrich review serve configs/companies.toml\n\n"
    "exit codes: see enrich review apply --help, enrich review serve --help",
    "review apply": "example:\n  enrich review apply configs/companies.toml out/companies.enriched.review.csv\n\n"
    "exit codes: 0 applied, 2 bad review file (nothing applied; names line and problem), 74 disk full",
    "calibrate": "example:\n  enrich calibrate out/companies.enriched.parquet.journal.sqlite\n\n"
    "exit codes: 0 calibration printed (nothing is changed), 2 no such journal or unreadable",
    "review serve": "example:\n  enrich review serve configs/companies.toml --reviewer ana\n\n"
    "exit codes: 0 stopped (output rewritten), 2 no journal for the job or the port is taken, 74 disk full",
    "export": "example:\n  enrich export out/companies.enriched.parquet.journal.sqlite --output out/companies.xlsx "
    "--basis out/evidence.parquet\n\n"
    "exit codes: 0 written, 2 usage/journal error or unsupported output extension, 74 disk full",
    "emulator": "example:\n  enrich emulator --port 8765 --faults 429=0.05\n\n"
    "exit codes: 0 stopped, 2 bad option or the port is taken",
    "init": "example:\n  enrich init data/companies.xlsx --config configs/mine.toml\n\n"
    "exit codes: 0 config written, 2 the config exists already or the data file is unusable",
    "cache": "examples:\n  enrich cache stats ~/.cache/enrich/results.sqlite\n"
    "  enrich cache prune ~/.cache/enrich/results.sqlite --older-than 90d\n\n"
    "exit codes: 0 done, 2 no such cache, or not a results cache",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the same single line every other error uses (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"enrich: error: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="enrich",
        description="Turn a spreadsheet into a researched one with "
        "Parallel's Task API: resumable, budgeted, with evidence per field.",
        epilog="example:\n  enrich init data/companies.csv && enrich run companies.toml "
        "--emulator\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"enrich {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def job_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="job config (TOML)")
        sp.add_argument("--input", help="input .csv, .parquet or .xlsx (overrides input.path)")
        sp.add_argument(
            "--output",
            help="output .csv, .parquet or .xlsx (overrides output.path); reports "
            "<output>.report.json and <stem>.report.html go beside it",
        )
        sp.add_argument("--journal", help="journal file (default: beside the output)")
        sp.add_argument("--processor", help="processor, e.g. lite-fast, base, core (overrides task.processor)")
        sp.add_argument("--budget", type=finite_nonneg, metavar="USD", help="spend cap for this journal, in USD")
        sp.add_argument("--max-in-flight", type=positive_int, metavar="N", help="runs submitted but not finished")
        sp.add_argument("--base-url", help=f"API base URL (default: config, $PARALLEL_BASE_URL, {DEFAULT_BASE_URL})")
        sp.add_argument(
            "--emulator",
            action="store_true",
            help="run against the bundled emulator (no key, no cost; outputs are marked as emulated)",
        )
        sp.add_argument("--retry-failed", action="store_true", help="research failed and timed-out rows again")
        sp.add_argument(
            "--journal-mode",
            choices=["auto", "local", "network"],
            help="local: WAL; network: SQLite's rollback journal, for journals on NFS/SMB/FUSE shared storage; "
            "auto (default) detects the file system (overrides limits.journal_mode)",
        )
        reuse = sp.add_mutually_exclusive_group()
        reuse.add_argument(
            "--cache",
            metavar="PATH",
            help="results cache shared across jobs (overrides [cache] path): completed results are reused, "
            "new ones stored",
        )
        reuse.add_argument("--no-cache", action="store_true", help="use no results cache, even one the config names")

    run = add("run", "enrich the input (continues an interrupted job)")
    job_flags(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit (no API calls)")
    run.add_argument(
        "--detach",
        action="store_true",
        help="submit every pending row (rate limit and budget "
        "apply), then exit 0; the same command without --detach later collects and writes",
    )
    run.add_argument(
        "--adopt",
        action="store_true",
        help="take over a journal recorded for another job (different output, task spec, key columns or API key)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete the journal (its results are lost; rows are paid for again) and do not "
        "read the results cache (new results are still stored in it)",
    )
    run.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run as partitions on Ray: no ADDRESS "
        "starts a local Ray, `auto` or ray://HOST:PORT joins a cluster (see README, Scaling out)",
    )
    run.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="with --ray: partitions to cut the input into "
        "(default: one per 50,000 rows; an input directory: at least one per file)",
    )
    pi = add(
        "pilot",
        "research a seeded sample on each processor, then forecast cost and accepted share of every strategy "
        "(the full run reuses every pilot result)",
    )
    job_flags(pi)
    pi.add_argument("--rows", type=positive_int, default=50, metavar="N", help="rows to sample (default: 50)")
    pi.add_argument(
        "--processors",
        metavar="LIST",
        help="processors to try, weakest first (default: the job's own, [task] processor then [escalate] "
        "processors, when the config sets either; else lite,base,core)",
    )
    pi.add_argument(
        "--seed", type=int, default=0, help="seed of the sample and of the forecast intervals' draws (default: 0)"
    )
    pi.add_argument(
        "--target-accepted",
        type=fraction,
        default=0.9,
        metavar="SHARE",
        help="accepted share of fields to reach: the cheapest strategy that does is recommended (default: 0.9)",
    )
    pi.add_argument("--json", action="store_true", help="print the findings as JSON")
    plan = add("plan", "rows, cost and duration estimate; no API calls")
    job_flags(plan)

    def locate_flags(sp: argparse.ArgumentParser, output: bool = True) -> None:
        """The flags of `run` that say where a job lives, for commands that open an existing job."""
        sp.add_argument("--input", help="as given to run (overrides input.path)")
        if output:
            sp.add_argument("--output", help="as given to run: the job's output (overrides output.path)")
        sp.add_argument("--journal", help="as given to run (default: beside the output)")

    st = add("status", "counts by state, spend, last error (works while a run is live)")
    st.add_argument("job", help="the job's journal (*.journal.sqlite, beside the output by default) or its config")
    locate_flags(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ca = add("calibrate", "how often each confidence level was right in your reviews, and what a gate change would do")
    ca.add_argument("job", help="the job's journal (*.journal.sqlite) or its config (TOML)")
    locate_flags(ca)
    ca.add_argument("--json", action="store_true", help="machine-readable output")
    ex = add("export", "write the job's output again, to another file, from the journal alone (no API calls)")
    ex.add_argument("job", help="the job's journal (*.journal.sqlite) or its config (TOML)")
    ex.add_argument("--output", help="file to write: .csv, .parquet or .xlsx (by extension)")
    ex.add_argument(
        "--basis", metavar="PATH", help="also write the evidence, one line per (row, field, citation): .parquet or .csv"
    )
    ex.add_argument("--config", help="the job's config: checked against the job the journal recorded")
    locate_flags(ex, output=False)
    em = add("emulator", "serve the API-compatible emulator on loopback")
    em.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    em.add_argument("--port", type=port, default=8765, help="port to listen on; 0 picks a free one (default: 8765)")
    em.add_argument("--knowledge", help="CSV/Parquet knowledge table (default: bundled companies)")
    em.add_argument("--knowledge-key", default="company", help="column matched against run inputs")
    em.add_argument("--time-scale", type=finite_nonneg, default=1.0, help="latency multiplier (0 = instant)")
    em.add_argument("--seed", type=int, default=0, help="random seed for latencies and faults (default: 0)")
    em.add_argument("--fail-rate", type=fraction, default=0.0, help="share of runs that fail")
    em.add_argument("--rate-limit", type=nonneg_int, default=2000, help="creating POSTs per minute per key (0 = off)")
    em.add_argument("--credit-usd", type=finite_nonneg, help="account credit; 402 when it cannot cover new runs")
    em.add_argument(
        "--faults", default="", help='e.g. "429=0.05,422=0.01,500=0.02,503=0.01,drop=0.02,slow=0.01,truncate=0.01"'
    )
    em.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    em.add_argument(
        "--behaviours",
        default="",
        metavar="LIST",
        help="comma-separated server behaviours to switch on: cut, snapshots, eventual, shuffle, "
        "framing, basis, connections, endings, errors, lost, nometa, expiry, action, echo, or all",
    )
    em.add_argument(
        "--hard-rate",
        type=float,
        default=0.0,
        metavar="X",
        help="share of (row, field) cells that need a stronger processor (weaker ones answer medium/low confidence)",
    )
    rv = add("review", "human review: apply a filled-in <output>.review.csv, or review in a local web page")
    actions = rv.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return actions.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOGS[f"review {name}"],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    ap = action("apply", "record the verdicts of a filled-in review file and rewrite the output")
    ap.add_argument("job", help="the job's config (TOML), with the flags it ran with, or its journal")
    ap.add_argument(
        "reviewed",
        help="the review file with verdict (accept|correct|reject), corrected_value, reviewer and note filled in",
    )
    locate_flags(ap)
    sv = action(
        "serve",
        "review in a local web page: each line with its evidence, accept / correct / reject by key; "
        "the output is rewritten on `write output` and when the page stops (Ctrl-C)",
    )
    sv.add_argument("job", help="the job's config (TOML), with the flags it ran with, or its journal")
    locate_flags(sv)
    sv.add_argument("--port", type=port, default=0, help="port to listen on (default: 0, a free one)")
    sv.add_argument(
        "--host",
        help="address to listen on (default: 127.0.0.1, this machine only); another address is reachable by "
        "others (a warning says so)",
    )
    sv.add_argument("--reviewer", help="name recorded with each verdict (default: your user name)")
    sv.add_argument("--no-browser", action="store_true", help="only print the page's URL; do not open a browser")
    cc = add("cache", "a results cache shared by jobs: what it holds, or prune old entries")
    cc.add_argument("action", choices=["stats", "prune"], help="stats: entries and their value; prune: remove old ones")
    cc.add_argument("path", help="the cache file ([cache] path or --cache of run)")
    cc.add_argument("--older-than", metavar="AGE", help="prune: entries completed longer ago than AGE (90d, 12h, 2w)")
    cc.add_argument("--json", action="store_true", help="stats: machine-readable output")
    ini = add("init", "write a commented starter config from a data file's columns (asks nothing)")
    ini.add_argument("data", help="the data file: .csv, .parquet or .xlsx (first sheet)")
    ini.add_argument("--config", help="config file to write (default: <data stem>.toml here; never overwritten)")
    return p


class _QuietStream:
    """stderr for the CLI: a write that fails (the terminal closed, `2>&1 | head` exited) points the
    descriptor at /dev/null and is dropped, so a message can never change how a job ends."""

    def __init__(self, stream: Any):
        self._stream = stream

    def _lost(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())  # what is still buffered drains into /dev/null
            os.close(null)

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except (OSError, ValueError):
            self._lost()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._lost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _guard_std_streams() -> None:
    """Started with stdin, stdout or stderr closed (`>&-`, `2>&-`): give those descriptors /dev/null, so no
    file enrich opens can take their number and every print has somewhere to go; stderr then stays quiet
    when writing to it fails (_QuietStream)."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, mode)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:  # Python found the descriptor closed at start-up
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115  # lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    if not isinstance(sys.stderr, _QuietStream):
        sys.stderr = _QuietStream(sys.stderr)


def _settled(args: argparse.Namespace) -> list[str] | None:
    """`enrich run` of a finished job whose config, input, journal and files are as its last run left them:
    the lines that run would print, from the journal alone (settled.py). None: run it (every flag that
    asks for work, or any doubt, goes to the full run, which also reports every error)."""
    if args.command != "run" or args.dry_run or args.detach or args.adopt or args.fresh or args.retry_failed:
        return None
    if args.ray is not None or args.partitions is not None:
        return None
    key = EMULATOR_KEY if args.emulator else os.environ.get("PARALLEL_API_KEY", "").strip()
    if not key:  # a key file, or none: the full run resolves (or refuses) it
        return None
    try:
        cfg = load(args)
    except EnrichError:
        return None
    return settled.answer(cfg, key, bool(args.emulator))


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    _guard_std_streams()
    try:
        return _main(argv)
    finally:
        if streams[1] is not None:  # an in-process caller (tests, a notebook) gets its own streams back
            sys.stdout, sys.stderr = streams[0] or sys.stdout, streams[1]


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "emulator", False) and getattr(args, "base_url", None):
        parser.error("--emulator runs the bundled emulator, --base-url names another server: give one of them")
    secret = os.environ.get("PARALLEL_API_KEY")
    try:
        if (lines := _settled(args)) is not None:
            for line in lines:
                print(f"enrich: {line}", file=sys.stderr)
            return EXIT_OK
        import enrich.commands  # the one deferred import: the pipeline (about a second) loads only for work

        code = enrich.commands.dispatch(args)
        sys.stdout.flush()  # a closed pipe (`enrich plan | head -1`) surfaces here, not at exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away: say nothing more, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK if args.command in ("plan", "status") else EXIT_INTERRUPTED
    except EnrichError as exc:
        print(f"enrich: error: {redact(str(exc), secret)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        # a full disk under a file written outside a job (export, review apply, init): files are replaced
        # atomically (a temp file, then a rename), so nothing was half-written
        safe = "no file was half-written, and the journal is unchanged"
        msg = (
            disk_message(exc.filename, exc.strerror or str(exc), safe)
            if exc.filename
            else f"{exc.strerror or exc}: free space on the disk holding the output, then run the same command "
            f"again: {safe}"
        )
        print(f"enrich: error: {redact(msg, secret)}", file=sys.stderr)
        return EXIT_DISK
    except KeyboardInterrupt:
        print("enrich: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
