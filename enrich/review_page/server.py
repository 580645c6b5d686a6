"""`enrich review serve`: the review page on loopback, until Ctrl-C (or SIGTERM); then the output is rewritten.

The server listens on 127.0.0.1 unless `--host` names another address (a warning says who can reach it
then). Its URL holds a random token (`http://127.0.0.1:PORT/<token>/`); it is printed on stdout, and
opened in the browser unless `--no-browser`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import signal
import socket
import sys
import threading
import webbrowser
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enrich.errors import EXIT_OK, ConfigError, JournalLocked
from enrich.review_page.app import App
from enrich.review_page.session import Session


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except OverflowError:
        sock.close()
        raise ConfigError(f"--port {port} is not a port number") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReviewServer:
    """The review page of one Session on `host:port` (port 0 = a free one), served from a daemon thread."""

    def __init__(self, session: Session, host: str = "127.0.0.1", port: int = 0):
        self.session = session
        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.token = secrets.token_urlsafe(32)
        shown = f"[{host}]" if ":" in host else host
        # a page on another site cannot reach this server by a DNS name that points at loopback (rebinding):
        # only the addresses it listens on are accepted as Host; a non-loopback --host accepts any name
        hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}", f"{shown}:{self.port}"}
        self.app = App(session, self.token, hosts if is_loopback(host) else None)
        self.url = f"http://{shown}:{self.port}/{self.token}/"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> ReviewServer:
        import uvicorn  # loaded only by `enrich review serve`

        config = uvicorn.Config(
            self.app, loop="asyncio", http="httptools", lifespan="on", log_level="error", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.sock]}, name="enrich-review-page", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the review page failed to start")
            self._thread.join(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()

    def __enter__(self) -> ReviewServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    target: str | Path,
    overrides: Mapping[str, Any] | None,
    flags: Mapping[str, str] | None,
    *,
    host: str | None = None,
    port: int = 0,
    reviewer: str = "",
    browser: bool = True,
) -> int:
    """The `enrich review serve` command: serve until stopped, then rewrite the output. Returns the exit code."""
    session = Session(target, overrides, flags, reviewer)
    for note in session.notes:
        print(f"enrich: {note}", file=sys.stderr)
    host = host or "127.0.0.1"
    if not is_loopback(host):
        print(
            f"enrich: warning: the review page listens on {host}, not only on this machine: anyone who can reach "
            "it and has the URL (its token) can read the job and record verdicts",
            file=sys.stderr,
        )
    server = ReviewServer(session, host, port).start()
    queue = session.view().queue
    try:
        print(server.url, flush=True)
        print(
            f"enrich: review page for {session.output}: {queue.left:,} lines left, {queue.done:,} done; "
            "Ctrl-C writes the output and stops",
            file=sys.stderr,
            flush=True,
        )
        if browser:
            with contextlib.suppress(Exception):  # no browser here (a server, ssh): the URL above is enough
                webbrowser.open(server.url)
        _wait_for_stop()
    finally:
        server.stop()
    try:
        report = session.write()
    except JournalLocked:
        print(
            f"enrich: stopped; {session.recorded} verdicts are recorded in the journal; another enrich process "
            "holds it, so the output was not rewritten: the run writes it when it ends",
            file=sys.stderr,
        )
        return EXIT_OK
    said = (
        f"enrich: stopped; {session.recorded} verdicts recorded; rewrote {report['output']} ({report['rows']:,} rows)"
    )
    if report.get("review_file"):
        said += f"; {report['review_lines']:,} lines left to review in {report['review_file']}"
    print(said, file=sys.stderr)
    return EXIT_OK
