"""The `enrich` command's entry point (the console script and `python -m enrich`).

Loading the CLI takes about 0.4 s (polars, pyarrow, the config's models). A Ctrl-C in that window, or while
the flags are parsed, ends the process with one line and EXIT_INTERRUPTED, as it does later, instead of a
traceback: nothing has been read, journaled or sent yet. The guard is this module's first act: a SIGINT handler
that only notes the Ctrl-C, so it cannot land inside an import; once the CLI is loaded the default handler is
back (each command handles its own Ctrl-C) and a noted Ctrl-C ends the process before the command starts.
"""

from __future__ import annotations

# signal's C core, built in: `import signal` first builds its enums, a window in which a Ctrl-C would land
import _signal  # type: ignore[import-not-found]
import contextlib  # loaded by Python's start-up (site) already, as sys is
import sys

_pressed: list[int] = []


def _note(signum: int, _frame: object) -> None:
    _pressed.append(signum)


with contextlib.suppress(ValueError):  # not the main thread (an embedding host): nothing to guard
    _signal.signal(_signal.SIGINT, _note)

from enrich.errors import EXIT_INTERRUPTED  # noqa: E402  (after the guard: this import takes a while)


def _interrupted() -> int:
    with contextlib.suppress(OSError, ValueError):  # stderr closed or gone: the exit code still says it
        print("enrich: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def main() -> int:
    try:
        import enrich.cli  # deferred, so that a Ctrl-C while it loads is noted, not raised inside an import

        if _signal.getsignal(_signal.SIGINT) is _note:
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        if _pressed:
            return _interrupted()
        return enrich.cli.main()
    except KeyboardInterrupt:  # while the flags are parsed, before a command has its own handling
        return _interrupted()
