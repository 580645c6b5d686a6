"""Run the emulator: in a background thread (tests, `enrich run --emulator`) or in the
foreground (`enrich emulator`). Either way it is a real HTTP server on loopback."""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

import uvicorn

from enrich.emulator.app import App
from enrich.emulator.core import Emulator, EmulatorConfig


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every response (headers, then body) waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class EmulatorServer:
    """An emulator bound to `host:port` (port 0 = a free port). Use as a context manager:

    with EmulatorServer(EmulatorConfig(time_scale=0)) as emu:
        client = Parallel(api_key="x", base_url=emu.base_url)
    """

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or EmulatorConfig()
        self.emulator = Emulator(self.config)
        self.app = App(self.emulator)
        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _make_server(self) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            log_level="error",
            access_log=False,
            timeout_keep_alive=30,
            backlog=2048,
        )
        return uvicorn.Server(config)

    def start(self) -> EmulatorServer:
        """Serve from a daemon thread; return once it accepts connections."""
        self._server = self._make_server()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.sock]}, name="enrich-emulator", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the emulator failed to start")
            self._thread.join(0.01)
        return self

    def request_stop(self) -> None:
        """Ask the server to shut down without waiting (`stop` waits): it winds down while the caller works."""
        if self._server is not None:
            self._server.should_exit = True

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()

    def serve_forever(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (the `enrich emulator` command)."""
        self._server = self._make_server()
        print(
            f"enrich emulator listening on {self.base_url} "
            f"(time scale {self.config.time_scale}, rate limit {self.config.rate_limit}/min"
            f"{', behaviours ' + self.config.behaviours if self.config.behaviours else ''}"
            f"{f', hard rate {self.config.hard_rate}' if self.config.hard_rate else ''})",
            file=sys.stderr,
            flush=True,
        )
        self._server.run(sockets=[self.sock])

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
