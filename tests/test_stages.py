"""Stage rules under server behaviours the spec allows, in-process through the client's transport seam.

Each test runs the real job (`run_job`) against the real emulator over loopback HTTP; a
tampering transport between them plays one behaviour the published API allows but our emulator
does not show by default (run ids out of order, streams that carry no completions, stale
listings, slow result fetches, rate limiting, an auth error while polling). A watchdog bounds
every job: liveness is asserted, never waited out with `row_timeout_s`.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from enrich.config import load_config
from enrich.job import EXIT_AUTH, EXIT_OK, EXIT_USAGE, JobResult, run_job
from tests.conftest import ROOT, run_enrich, wait_for, with_watchdog, write_config

Edit = Callable[[httpx.Request, httpx.AsyncHTTPTransport], Awaitable[httpx.Response]]
with (ROOT / "enrich/data/companies_knowledge.csv").open(encoding="utf-8") as _f:
    KNOWLEDGE = {r["company"]: r["headquarters_location"] for r in csv.DictReader(_f)}


class Tamper(httpx.AsyncBaseTransport):
    """Forwards every request to the real server; `edit` may change what comes back."""

    def __init__(self, edit: Edit):
        self.inner = httpx.AsyncHTTPTransport()
        self.edit = edit
        self.calls: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = _kind(request)
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return await self.edit(request, self.inner)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _kind(request: httpx.Request) -> str:
    path = request.url.path
    if request.method == "POST" and path.endswith("/runs"):
        return "add_runs"
    if path.endswith("/events"):
        return "events"
    if path.endswith("/runs"):
        return "listing"
    if path.endswith("/result"):
        return "result"
    return request.method + " " + path.split("/")[3] if path.count("/") >= 3 else path


async def passthrough(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
    return await inner.handle_async_request(request)


async def rebuilt(resp: httpx.Response, body: bytes) -> httpx.Response:
    headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-encoding")]
    return httpx.Response(resp.status_code, headers=headers, content=body)


def sse_filter(
    resp: httpx.Response, keep: Callable[[dict[str, Any]], dict[str, Any] | None], max_events: int | None = None
) -> httpx.Response:
    """Rewrite an SSE response event by event (`keep` returns the event to send, or None to drop it)."""

    async def stream() -> Any:
        buf = b""
        sent = 0
        async for chunk in resp.aiter_raw():
            buf += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                data = b"".join(line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:"))
                if not data:
                    continue
                event = keep(json.loads(data))
                if event is not None:
                    yield b"data: " + json.dumps(event).encode() + b"\n\n"
                    sent += 1
                    if max_events is not None and sent >= max_events:
                        await resp.aclose()
                        return
        await resp.aclose()

    headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-encoding")]
    return httpx.Response(resp.status_code, headers=headers, content=stream())


def _job(tmp_path: Path, limits: str = "", rows: int | None = None) -> Any:
    src = ROOT / "data/companies.csv"
    if rows is not None:
        lines = src.read_text(encoding="utf-8").splitlines()[: rows + 1]
        src = tmp_path / "in.csv"
        src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company", "website"],
        limits=limits,
    )


def run(
    tmp_path: Path,
    base_url: str,
    edit: Edit = passthrough,
    limits: str = "",
    watchdog_s: float = 60,
    rows: int | None = None,
    **kw: Any,
) -> tuple[JobResult, Tamper]:
    """run_job in a thread under a watchdog: a hung job fails the test instead of hanging it."""
    cfg = load_config(_job(tmp_path, limits, rows), {"api.base_url": base_url})
    tamper = Tamper(edit)
    result = with_watchdog(
        lambda: run_job(cfg, api_key="sk-test-key-1234", install_signals=False, transport=tamper, **kw),
        watchdog_s,
        f"the job (calls: {tamper.calls})",
    )
    return result, tamper


def output_rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def own_facts(rows: list[dict[str, str]]) -> None:
    """Every row completed with its own company's headquarters (never another row's)."""
    assert rows and all(r["_enrich_status"] == "completed" for r in rows), {r["_enrich_status"] for r in rows}
    for r in rows:
        assert r["headquarters_location"] == KNOWLEDGE.get(r["company"], ""), r["company"]  # unknown: null


def ledger(emu: Any) -> list[dict[str, Any]]:
    return httpx.get(emu.base_url + "/_emulator/ledger", timeout=10).json()


def test_run_ids_out_of_order_still_give_each_row_its_own_facts(tmp_path: Path, emulator) -> None:
    """add-runs ids reversed: results are matched by metadata, never by position."""
    emu = emulator()

    async def reverse(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        resp = await inner.handle_async_request(request)
        if _kind(request) != "add_runs" or resp.status_code >= 300:
            return resp
        body = json.loads(await resp.aread())
        body["run_ids"] = body["run_ids"][::-1]
        return await rebuilt(resp, json.dumps(body).encode())

    result, tamper = run(tmp_path, emu.base_url, reverse)
    assert result.exit_code == EXIT_OK and tamper.calls["add_runs"] >= 1
    own_facts(output_rows(tmp_path))
    assert len(ledger(emu)) == 55


def test_streams_without_completions_still_finish(tmp_path: Path, emulator) -> None:
    """Event streams cut after one snapshot and never carrying a completion: the watchdog finishes the job."""
    emu = emulator(time_scale=0.02)

    async def mute(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        resp = await inner.handle_async_request(request)
        if _kind(request) == "events" and resp.status_code == 200:
            return sse_filter(resp, lambda e: e if e.get("type") != "task_run.state" else None, max_events=1)
        return resp

    result, tamper = run(tmp_path, emu.base_url, mute, limits="recheck_s = 1", watchdog_s=45)
    assert result.exit_code == EXIT_OK
    own_facts(output_rows(tmp_path))
    assert tamper.calls.get("events", 0) < 200  # reconnects are paced, never a tight loop


def test_a_completion_is_never_dropped_for_a_stale_listing(tmp_path: Path, emulator) -> None:
    """Listings that show finished runs as `running` (stale) never make the job forget a completion."""
    emu = emulator(time_scale=0.0)
    stale = {"left": 6}

    async def lie(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        resp = await inner.handle_async_request(request)
        if _kind(request) == "listing" and resp.status_code == 200 and stale["left"] > 0:
            stale["left"] -= 1

            def running(e: dict[str, Any]) -> dict[str, Any]:
                if isinstance(e.get("run"), dict):
                    e = {**e, "run": {**e["run"], "status": "running", "is_active": True}}
                    e.pop("output", None)
                return e

            return sse_filter(resp, running)
        if _kind(request) == "result" and stale["left"] > 0:
            return httpx.Response(408, json={"error": {"message": "not ready", "ref_id": "x"}})
        return resp

    result, _ = run(tmp_path, emu.base_url, lie, limits="recheck_s = 1", watchdog_s=45)
    assert result.exit_code == EXIT_OK
    own_facts(output_rows(tmp_path))


def test_slow_fetches_never_time_out_finished_runs(tmp_path: Path, emulator) -> None:
    """Results that arrive after row_timeout_s are kept: a row times out only if the API says it is active."""
    emu = emulator(time_scale=0.0)

    async def slow(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        if _kind(request) in ("listing", "result"):
            await asyncio.sleep(2.5)
        return await inner.handle_async_request(request)

    result, _ = run(tmp_path, emu.base_url, slow, rows=10, limits="row_timeout_s = 1\nrecheck_s = 1")
    assert result.exit_code == EXIT_OK, result.message
    own_facts(output_rows(tmp_path))


def test_rate_limiting_never_fails_rows(tmp_path: Path, emulator) -> None:
    """Many 429s on add-runs (more than max_attempts per row) leave no row failed and create each run once."""
    emu = emulator(time_scale=0.0)
    left = {"n": 12}

    async def throttle(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        if _kind(request) == "add_runs" and left["n"] > 0:
            left["n"] -= 1
            return httpx.Response(
                429, headers={"retry-after-ms": "10"}, json={"error": {"message": "slow down", "ref_id": "x"}}
            )
        return await inner.handle_async_request(request)

    result, tamper = run(tmp_path, emu.base_url, throttle, rows=5, limits="max_attempts = 2\nbatch_size = 1")
    assert result.exit_code == EXIT_OK, result.message
    own_facts(output_rows(tmp_path))
    assert tamper.calls["add_runs"] > 12 and len(ledger(emu)) == 5


def test_auth_error_while_polling_stops_at_once_with_exit_5(tmp_path: Path, emulator) -> None:
    """A 401 on the event stream or listings ends the job with exit 5, not after row_timeout_s."""
    emu = emulator(time_scale=0.5)

    seen: dict[str, int] = {}

    async def edit(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        seen[_kind(request)] = seen.get(_kind(request), 0) + 1
        if request.method == "GET" and "/groups/" in request.url.path and seen.get("add_runs"):
            return httpx.Response(401, json={"error": {"message": "key revoked", "ref_id": "x"}})
        return await inner.handle_async_request(request)

    result, _ = run(tmp_path, emu.base_url, edit, rows=5, limits="row_timeout_s = 3600", watchdog_s=30)
    assert result.exit_code == EXIT_AUTH and "key revoked" in result.message
    rows = output_rows(tmp_path)
    assert {r["_enrich_status"] for r in rows} <= {"pending", "unknown", "completed"}
    assert all("key revoked" in r["_enrich_error"] for r in rows if r["_enrich_status"] != "completed")


def test_short_grace_is_refused(tmp_path: Path) -> None:
    """reconcile_grace_s must exceed request_timeout_s (the creating POST's total deadline)."""
    from enrich.errors import ConfigError

    cfg = _job(tmp_path, limits="")
    text = cfg.read_text().replace("reconcile_grace_s = 3", "reconcile_grace_s = 1")
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="reconcile_grace_s"):
        load_config(cfg)


def test_emulator_is_recognised_through_base_url(tmp_path: Path, emulator) -> None:
    """Reached via --base-url, the emulator's header still marks the output and report as emulated."""
    emu = emulator(time_scale=0.0)
    result, _ = run(tmp_path, emu.base_url, rows=3)
    assert result.exit_code == EXIT_OK and result.report["emulated"] is True and "[EMULATED]" in result.message


def test_missing_journal_with_researched_output_is_refused(tmp_path: Path, emulator) -> None:
    """Journal deleted or emptied while the output holds run ids: exit 2 before paying; --fresh starts over."""
    from enrich.errors import JournalError

    emu = emulator(time_scale=0.0)
    result, _ = run(tmp_path, emu.base_url, rows=3)
    assert result.exit_code == EXIT_OK and len(ledger(emu)) == 3
    journal = tmp_path / "out.csv.journal.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    with pytest.raises(JournalError, match="--fresh") as info:
        run(tmp_path, emu.base_url, rows=3)
    assert info.value.exit_code == EXIT_USAGE and len(ledger(emu)) == 3
    journal.write_bytes(b"")  # emptied
    with pytest.raises(JournalError, match="--fresh"):
        run(tmp_path, emu.base_url, rows=3)
    result, _ = run(tmp_path, emu.base_url, rows=3, fresh=True)
    assert result.exit_code == EXIT_OK and len(ledger(emu)) == 6


def test_default_journals_do_not_collide(tmp_path: Path, emulator) -> None:
    """x.lite.csv and x.base.csv get their own journals: alternating them pays for each row once."""
    emu = emulator(time_scale=0.0)
    for out in ("x.lite.csv", "x.base.csv", "x.lite.csv", "x.base.csv"):
        cfg = load_config(_job(tmp_path, rows=3), {"api.base_url": emu.base_url, "output.path": str(tmp_path / out)})
        assert run_job(cfg, api_key="sk-test-key-1234", install_signals=False).exit_code == EXIT_OK
    assert len(ledger(emu)) == 6
    assert (tmp_path / "x.lite.csv.journal.sqlite").exists() and (tmp_path / "x.base.csv.journal.sqlite").exists()


def test_journal_refuses_another_jobs_identity(tmp_path: Path, emulator) -> None:
    """A journal given to a job with another output or task spec exits 2 unless --adopt."""
    from enrich.errors import JournalError

    emu = emulator(time_scale=0.0)
    journal = str(tmp_path / "shared.sqlite")
    cfg = load_config(_job(tmp_path, rows=3), {"api.base_url": emu.base_url, "journal": journal})
    assert run_job(cfg, api_key="sk-test-key-1234", install_signals=False).exit_code == EXIT_OK
    other = load_config(
        _job(tmp_path, rows=3),
        {"api.base_url": emu.base_url, "journal": journal, "output.path": str(tmp_path / "other.csv")},
    )
    with pytest.raises(JournalError, match="another job"):
        run_job(other, api_key="sk-test-key-1234", install_signals=False)
    assert run_job(other, api_key="sk-test-key-1234", install_signals=False, adopt=True).exit_code == EXIT_OK
    assert len(ledger(emu)) == 3  # adopted: the results are reused, nothing paid again


def test_unwritable_output_is_one_line_and_loses_nothing(tmp_path: Path, emulator) -> None:
    """The output path turns unwritable mid-run: OutputError (exit 2), results kept; the rerun pays nothing."""
    from enrich.errors import OutputError

    emu = emulator(time_scale=0.0)
    out = tmp_path / "out.csv"

    async def block(request: httpx.Request, inner: httpx.AsyncHTTPTransport) -> httpx.Response:
        resp = await inner.handle_async_request(request)
        if _kind(request) == "add_runs":
            out.mkdir(exist_ok=True)  # the writer's rename onto it will fail
        return resp

    (tmp_path / ".out.csv.tmp-999999999").write_text("left by a killed write")
    with pytest.raises(OutputError, match="safe in") as info:
        run(tmp_path, emu.base_url, block, rows=5)
    assert info.value.exit_code == EXIT_USAGE and "\n" not in str(info.value)
    assert not (tmp_path / ".out.csv.tmp-999999999").exists()  # stale temp files are removed at start
    out.rmdir()
    result, _ = run(tmp_path, emu.base_url, rows=5)
    assert result.exit_code == EXIT_OK and len(ledger(emu)) == 5
    own_facts(output_rows(tmp_path))


def test_nothing_listening_is_exit_69_with_the_url(tmp_path: Path) -> None:
    """No server at the base URL: exit 69 (not 3) naming the URL, nothing recorded as sent."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cfg = _job(tmp_path, rows=3)
    r = run_enrich("run", str(cfg), "--base-url", url)
    assert r.returncode == 69 and url in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_outage_longer_than_outage_give_up_s_stops_with_69(tmp_path: Path, emulator_process) -> None:
    """The API goes away mid-job: creating requests fail for outage_give_up_s, the job stops with exit 69
    (resumable), and a rerun against a live (restarted) emulator finishes the job."""
    emu = emulator_process("--time-scale", "0")
    cfg = _job(tmp_path, limits="batch_size = 5\nrequests_per_minute = 60\noutage_give_up_s = 3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "enrich", "run", str(cfg), "--base-url", emu.base_url],
        cwd=ROOT,
        env={**os.environ, "PARALLEL_API_KEY": "sk-test-key-1234"},
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(emu.ledger()) >= 5, timeout=60)
    emu.stop()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 69 and "Traceback" not in err and "no creating request succeeded" in err, err
    fresh = emulator_process("--time-scale", "0")
    r = run_enrich("run", str(cfg), "--base-url", fresh.base_url, key="sk-test-key-1234")
    assert r.returncode == 0, r.stderr


def test_detach_with_the_embedded_emulator_is_refused_before_a_journal_exists(tmp_path: Path) -> None:
    """--detach --emulator cannot work (the emulator dies with the process): exit 2, one line, no journal."""
    cfg = _job(tmp_path, rows=3)
    r = run_enrich("run", str(cfg), "--emulator", "--detach")
    assert r.returncode == 2 and "--detach needs a server" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv.journal.sqlite").exists()
