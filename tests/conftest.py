"""Shared fixtures: emulators (in-process thread or separate process), paths, helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings

from enrich.emulator import EmulatorConfig, EmulatorServer

settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("fuzz", max_examples=5000, deadline=None)  # make fuzz
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SP500 = SHARED / "datasets" / "sp500_constituents.csv"
OPENAPI = SHARED / "specs" / "parallel-openapi.json"
CANARY_KEY = "sk-CANARY-3f9d2a7c41b84e0f"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared reference material beside the project")
    return path


@pytest.fixture
def sp500() -> Path:
    return need_shared(SP500)


@pytest.fixture
def emulator() -> Iterator[Any]:
    """Factory: `emulator(**EmulatorConfig fields)` -> a started in-process EmulatorServer."""
    servers: list[EmulatorServer] = []

    def start(**kw: Any) -> EmulatorServer:
        kw.setdefault("time_scale", 0.0)
        server = EmulatorServer(EmulatorConfig(**kw)).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


class EmulatorProcess:
    """`enrich emulator` in its own process, so the process under test can be SIGKILLed."""

    def __init__(self, *args: str, log: Path | None = None):
        import tempfile

        self.log = log or Path(tempfile.mkstemp(prefix="enrich-emulator-", suffix=".log")[1])
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "enrich", "emulator", "--port", "0", *args], stderr=err, cwd=ROOT
            )
        deadline = time.monotonic() + 30
        line = ""
        while "listening on" not in line:
            line = self.log.read_text()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"emulator did not start: {line}")
            time.sleep(0.02)
        self.base_url = line.split("listening on ")[1].split()[0]

    def get(self, path: str) -> Any:
        return httpx.get(self.base_url + path, timeout=30).json()

    def post(self, path: str, body: Any = None) -> Any:
        return httpx.post(self.base_url + path, json=body, timeout=30).json()

    def ledger(self) -> list[dict[str, Any]]:
        return self.get("/_emulator/ledger")

    def stats(self) -> dict[str, Any]:
        return self.get("/_emulator/stats")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.unlink(missing_ok=True)


@pytest.fixture
def emulator_process() -> Iterator[Any]:
    procs: list[EmulatorProcess] = []

    def start(*args: str) -> EmulatorProcess:
        p = EmulatorProcess(*args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def run_enrich(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 300, key: str | None = CANARY_KEY
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a new process), with only PARALLEL_API_KEY set for the key."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    if key:
        full["PARALLEL_API_KEY"] = key
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "enrich", *args], capture_output=True, text=True, cwd=cwd, env=full, timeout=timeout
    )


def write_config(
    path: Path,
    *,
    input_path: Path,
    output: Path,
    key: list[str],
    columns: list[str],
    fields: dict[str, str] | None = None,
    processor: str = "lite-fast",
    extra: str = "",
    limits: str = "",
    emulator: str = "",
) -> Path:
    fields = fields or {"headquarters_location": "string"}
    lines = [
        "[input]",
        f"path = {json.dumps(str(input_path))}",
        f"key = {json.dumps(key)}",
        f"columns = {json.dumps(columns)}",
        "",
        "[task]",
        f'processor = "{processor}"',
        'instruction = "Research the company."',
        extra,
        "",
    ]
    for name, typ in fields.items():
        lines += [f"[task.output.{name}]", f'type = "{typ}"', ""]
    lines += [
        "[output]",
        f"path = {json.dumps(str(output))}",
        "",
        "[limits]",
        "reconcile_grace_s = 3",
        "request_timeout_s = 2",
        limits,
        "",
        "[emulator]",
        emulator,
    ]
    path.write_text("\n".join(lines))
    return path


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def with_watchdog(call: Any, seconds: float, what: str) -> Any:
    """Run `call()` on a thread; fail the test (never hang it) when it has not returned within `seconds`.

    This is how liveness is asserted: a bound on the whole job, never a wait for row_timeout_s."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # surfaced in the test's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # where every thread is, for the one who reads the failure
        import faulthandler
        import sys

        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    assert not t.is_alive(), f"liveness: {what} did not finish within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="session")
def ten_thousand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of 10,000 rows whose one field every row sends to review (the review page's paging tests)."""
    from tests.review_helpers import make_job  # review_helpers imports this module: not at the top

    rows = [
        {"company": f"Company {i:05d}", "headquarters_location": f"City {i}", "source_url": f"https://example.com/{i}"}
        for i in range(10_000)
    ]
    return make_job(
        tmp_path_factory.mktemp("ten-thousand"), rows, tier="base", fields={"headquarters_location": "string"}, extra=""
    )
