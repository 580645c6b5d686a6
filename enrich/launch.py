"""The `enrich` command's entry point (the console script and `python -m enrich`).

Loading the CLI takes about 0.4 s (polars, pyarrow, the config's models). A Ctrl-C in that window, or while
the flags are parsed, ends the process with one line and EXIT_INTERRUPTED, as it does later, instead of a
traceback: nothing has been read, journaled or sent yet.
"""

from __future__ import annotations

import contextlib
import sys

from enrich.errors import EXIT_INTERRUPTED


def main() -> int:
    try:
        import enrich.cli  # deferred, so that a Ctrl-C while it loads is caught here

        return enrich.cli.main()
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):  # stderr closed or gone: the exit code still says it
            print("enrich: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
