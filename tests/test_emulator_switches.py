"""Each switchable behaviour (`--behaviours`), alone, over real HTTP: it happens, and every response
still validates against the published OpenAPI spec. Plus the identity headers and `--hard-rate`."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from enrich import __version__
from enrich.config import EmulatorSection
from enrich.emulator import behaviours as bh
from enrich.emulator.behaviours import BEHAVIOURS, parse_behaviours
from enrich.emulator.knowledge import Knowledge, Quality, norm_value
from tests.conftest import OPENAPI, need_shared
from tests.test_emulator_openapi import check_response, fetch, parse_sse

H = {"x-api-key": "k"}
FIELDS = ("headquarters_location", "founded_year", "industry", "founders")
SCHEMA = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "additionalProperties": False,
            "required": list(FIELDS),
            "properties": {f: {"type": ["string", "null"]} for f in FIELDS},
        },
    }
}
COMPANIES = ["Apple", "Microsoft", "Alphabet", "Amazon", "Nvidia", "Meta", "Tesla", "IBM", "Intel", "3M"]


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return json.loads(need_shared(OPENAPI).read_text())


def client(emu: Any, timeout: float = 10) -> httpx.Client:
    return httpx.Client(base_url=emu.base_url, headers=H, timeout=timeout)


def inputs(n: int, processor: str = "lite") -> list[dict[str, Any]]:
    return [
        {
            "input": {"company": COMPANIES[i % len(COMPANIES)]},
            "processor": processor,
            "metadata": {"enrich_row": f"r{i}", "enrich_try": 1},
        }
        for i in range(n)
    ]


def group_with(c: httpx.Client, n: int, processor: str = "lite") -> tuple[str, dict[str, Any]]:
    gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
    added = c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs(n, processor), "default_task_spec": SCHEMA})
    assert added.status_code == 200
    return gid, added.json()


def events_of(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(e["data"]) for e in parse_sse(body)]


def test_parse_behaviours() -> None:
    assert parse_behaviours("cut, shuffle") == {"cut", "shuffle"}
    assert parse_behaviours("all") == set(BEHAVIOURS) == parse_behaviours("ALL,cut")
    assert parse_behaviours("") == frozenset()
    with pytest.raises(ValueError, match="unknown behaviour 'cuts'"):
        parse_behaviours("cuts")
    assert EmulatorSection(behaviours="cut,eventual", hard_rate=0.2).behaviours == "cut,eventual"
    with pytest.raises(ValidationError, match="unknown behaviour"):
        EmulatorSection(behaviours="cut,nope")
    with pytest.raises(ValidationError):
        EmulatorSection(hard_rate=1.5)


def test_identity_headers_on_every_response(emulator) -> None:
    """API replies, errors, streams and control routes all name the emulator and its instance;
    the instance id is fixed for a server (even across /_emulator/reset) and differs between servers."""
    a, b = emulator(), emulator()
    with client(a) as c:
        rid = c.post("/v1/tasks/runs", json={"input": "Apple", "processor": "lite"}).json()["run_id"]
        replies = [
            c.get(f"/v1/tasks/runs/{rid}"),
            c.get("/v1/tasks/runs/trun_nope"),
            c.get("/nowhere"),
            c.get(f"/v1/tasks/runs/{rid}/events"),
            c.get("/_emulator/stats"),
            c.post("/_emulator/reset"),
            c.get("/v1/tasks/runs/x", headers={"x-api-key": ""}),
        ]
    ids = {r.headers["x-enrich-emulator-instance"] for r in replies}
    assert {r.headers["x-enrich-emulator"] for r in replies} == {__version__}
    assert len(ids) == 1
    other = httpx.get(b.base_url + "/_emulator/stats").headers["x-enrich-emulator-instance"]
    assert other not in ids


def test_cut_ends_streams_early_without_terminal_event(spec, emulator) -> None:
    """Group events and run events streams of a group that stays active end within ~2 s, with no
    terminal event, in more than one way; some runs listings stop part-way."""
    emu = emulator(behaviours="cut", time_scale=1.0, seed=1)
    outcomes = set()

    def timed(path: str) -> tuple[float, httpx.Response | None, bytes]:
        with client(emu) as own:  # streams in parallel: each lasts 1-2 s
            t0 = time.monotonic()
            resp, body = fetch(own, "GET", path)
            return time.monotonic() - t0, resp, body

    with client(emu) as c:
        gid, added = group_with(c, 40)
        paths = [f"/v1/tasks/groups/{gid}/events"] * 6 + [f"/v1/tasks/runs/{added['run_ids'][0]}/events"]
        with ThreadPoolExecutor(len(paths)) as pool:
            streams = list(pool.map(timed, paths))
        for path, (took, resp, body) in zip(paths, streams, strict=True):
            assert took < 3.0
            if resp is None:  # reset before the headers were read
                outcomes.add("reset")
                continue
            check_response(spec, resp, body, plain_sse=False)
            events = events_of(body)
            assert all(e["status"]["is_active"] for e in events if e["type"] == "task_group_status")
            assert all(e.get("output") is None for e in events)  # a run stream's final state never came
            if "/groups/" in path:
                outcomes.add("clean" if body.endswith(b"\n\n") else "partial" if body else "reset")
        listed = []
        for _ in range(8):
            resp, body = fetch(c, "GET", f"/v1/tasks/groups/{gid}/runs")
            check_response(spec, resp, body, plain_sse=False)
            listed.append(len(parse_sse(body)))
    assert len(outcomes) >= 2, outcomes
    assert min(listed) < 40 and max(listed) == 40, listed


def test_snapshots_open_and_close_group_event_streams(spec, emulator) -> None:
    """With snapshots the first and last events are task_group_status; without, the replay of a
    finished group starts with a run event."""
    firsts = {}
    for behaviours in ("", "snapshots"):
        emu = emulator(behaviours=behaviours)
        with client(emu) as c:
            gid, _ = group_with(c, 5)
            resp = c.get(f"/v1/tasks/groups/{gid}/events")
            check_response(spec, resp, plain_sse=not behaviours)
            events = events_of(resp.content)
        firsts[behaviours] = events[0]["type"]
        if behaviours:
            assert events[-1]["type"] == "task_group_status" and events[-1]["status"]["num_task_runs"] == 5
            assert len([e for e in events if e["type"] == "task_run.state"]) == 5
    assert firsts == {"": "task_run.state", "snapshots": "task_group_status"}


def test_eventual_visibility_stale_listings_and_early_completions(spec, emulator) -> None:
    """Runs reach the listing within ~1 s, some first as stale `running` entries; completion events
    of some runs arrive before the add-runs reply."""
    emu = emulator(behaviours="eventual", time_scale=0.01, seed=2)
    with client(emu) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [{"input": "x", "processor": "ultra8x"}]})
        seen: list[tuple[float, dict[str, Any]]] = []

        def follow() -> None:
            with (
                httpx.Client(base_url=emu.base_url, headers=H, timeout=10) as s,
                s.stream("GET", f"/v1/tasks/groups/{gid}/events", params={"timeout": 3}) as resp,
            ):
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        seen.append((time.monotonic(), json.loads(line[6:])))

        watcher = threading.Thread(target=follow)
        watcher.start()
        time.sleep(0.3)
        added = c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs(60), "default_task_spec": SCHEMA})
        replied = time.monotonic()
        first = c.get(f"/v1/tasks/groups/{gid}/runs")
        check_response(spec, first)
        time.sleep(1.2)
        later = c.get(f"/v1/tasks/groups/{gid}/runs")
        check_response(spec, later)
        watcher.join()
    new = set(added.json()["run_ids"])
    early = [e for t, e in seen if t < replied and e["type"] == "task_run.state" and e["run"]["run_id"] in new]
    assert early and all(not e["run"]["is_active"] and e["run"]["metadata"] for e in early)
    assert len([e for e in events_of(first.content) if e["run"]["run_id"] in new]) < 60
    listed = [e for e in events_of(later.content) if e["run"]["run_id"] in new]
    assert len(listed) == 60 and all(e["run"]["metadata"]["enrich_row"] for e in listed)
    stale = [
        e
        for e in events_of(first.content) + events_of(later.content)
        if e["run"]["status"] == "running" and e["run"]["run_id"] in new
    ]
    assert stale, "no stale running entry was listed"


def test_shuffle_returns_run_ids_out_of_input_order(spec, emulator) -> None:
    emu = emulator(behaviours="shuffle")
    with client(emu) as c:
        gid, added = group_with(c, 20)
        check_response(spec, c.get(f"/v1/tasks/groups/{gid}"))
        listing = c.get(f"/v1/tasks/groups/{gid}/runs")
        check_response(spec, listing)
    in_order = [e["run"]["run_id"] for e in events_of(listing.content)]
    assert [e["run"]["metadata"]["enrich_row"] for e in events_of(listing.content)] == [f"r{i}" for i in range(20)]
    assert added["run_ids"] != in_order and sorted(added["run_ids"]) == sorted(in_order)


def test_framing_variety_is_still_valid_sse(spec, emulator) -> None:
    """CRLF, comments, id/retry fields, data without a space, JSON over several data lines, data-less
    unknown event types and frames split across chunks all occur; the WHATWG reading of every
    stream validates and loses no event."""
    emu = emulator(behaviours="framing", seed=5)
    bodies = []
    split_frames = 0
    with client(emu) as c:
        gid, added = group_with(c, 30)
        for path in (
            f"/v1/tasks/groups/{gid}/runs",
            f"/v1/tasks/groups/{gid}/events",
            f"/v1/tasks/runs/{added['run_ids'][0]}/events",
        ) * 3:
            with c.stream("GET", path) as resp:
                chunks = list(resp.iter_raw())
            split_frames += sum(1 for ch in chunks[:-1] if not ch.endswith((b"\n\n", b"\r\n\r\n")))
            body = b"".join(chunks)
            check_response(spec, resp, body, plain_sse=False)
            bodies.append(body)
    everything = b"".join(bodies)
    for marker in (b"\r\n", b"\n: ", b"\nid: ", b"\nretry: ", b"data:{", b"event:task", b"event: emulator.unknown"):
        assert marker in everything, marker
    assert any(
        sum(1 for line in body.splitlines() if line.startswith(b"data")) > len(parse_sse(body)) for body in bodies
    ), "no event had several data lines"
    assert split_frames > 0
    assert [len(parse_sse(b)) for b in bodies[:1]] == [30]  # the first listing: every run, once


def test_basis_variety(spec, emulator) -> None:
    """Missing basis entries, confidence "" and null, url-only citations, unknown keys on runs and outputs."""
    emu = emulator(behaviours="basis", seed=4)
    with client(emu) as c:
        gid, added = group_with(c, 30)
        listing = c.get(f"/v1/tasks/groups/{gid}/runs", params={"include_output": "true"})
        check_response(spec, listing)
        result = c.get(f"/v1/tasks/runs/{added['run_ids'][0]}/result")
        check_response(spec, result)
    outputs = [e["output"] for e in events_of(listing.content)]
    entries = [b for o in outputs for b in o["basis"]]
    confidences = [b.get("confidence", "absent") for b in entries]
    assert "" in confidences and None in confidences and "high" in confidences
    assert any(len(o["basis"]) < len(FIELDS) for o in outputs)
    assert any(set(cite) == {"url"} for b in entries for cite in b["citations"])
    assert all("x_emulator_trace" in o for o in outputs)
    assert "x_emulator_region" in result.json()["run"]
    assert all(e["run"]["metadata"]["enrich_row"] for e in events_of(listing.content))


def test_connections_misbehave_at_low_rates(spec, emulator) -> None:
    """Connection: close, 503 with Retry-After, 429 without it, early 408 on /result and idle
    keep-alive connections closed by the server; most requests still succeed."""
    emu = emulator(behaviours="connections", rate_limit=0, seed=6)
    statuses = []
    closes = 0
    with client(emu) as c:
        for i in range(150):
            r = c.post(
                "/v1/tasks/runs",
                json={"input": COMPANIES[i % 10], "processor": "lite", "metadata": {"enrich_row": str(i)}},
            )
            check_response(spec, r, generic=True)
            statuses.append(r.status_code)
            closes += r.headers.get("connection") == "close"
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
            if r.status_code == 429:
                assert "retry-after" not in r.headers
            if r.status_code == 202:
                res = c.get(f"/v1/tasks/runs/{r.json()['run_id']}/result")
                check_response(spec, res, generic=True)
                statuses.append(res.status_code)
    assert {202, 200, 408, 429, 503} <= set(statuses)
    assert statuses.count(202) > 120 and closes > 5
    assert _idle_drops(emu, 30) > 0


def _read_response(s: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a content-length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length"))
    )
    while len(body) < length:
        body += s.recv(65536)
    return head


def _idle_drops(emu: Any, n: int) -> int:
    """Open n keep-alive connections, one GET each; count those the server closes within 0.6 s idle."""
    host, port = emu.host, emu.port
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port))
        s.sendall(b"GET /v1/tasks/runs/trun_x HTTP/1.1\r\nhost: e\r\nx-api-key: k\r\n\r\n")
        head = _read_response(s)
        if b"connection: close" not in head.lower():
            socks.append(s)
        else:
            s.close()
    time.sleep(0.6)
    dropped = 0
    for s in socks:
        s.settimeout(0.05)
        with contextlib.suppress(TimeoutError, OSError):
            dropped += s.recv(1) == b""
        s.close()
    return dropped


def test_endings_failed_and_cancelled(spec, emulator) -> None:
    """Some runs end failed (error object) and some cancelled (no error); /result is 404 for both;
    metadata is echoed on all."""
    emu = emulator(behaviours="endings", seed=7)
    with client(emu) as c:
        gid, _ = group_with(c, 200)
        listing = c.get(f"/v1/tasks/groups/{gid}/runs")
        check_response(spec, listing)
        runs = [e["run"] for e in events_of(listing.content)]
        by_status: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            by_status.setdefault(run["status"], []).append(run)
        assert set(by_status) == {"completed", "failed", "cancelled"}
        assert all(r["error"]["message"] for r in by_status["failed"])
        assert all(r["error"] is None and not r["is_active"] for r in by_status["cancelled"])
        for status in ("failed", "cancelled"):
            rid = by_status[status][0]["run_id"]
            res = c.get(f"/v1/tasks/runs/{rid}/result")
            check_response(spec, res)
            assert res.status_code == 404
            got = c.get(f"/v1/tasks/runs/{rid}")
            check_response(spec, got)
            assert got.json()["status"] == status and got.json()["metadata"]["enrich_row"]
        group = c.get(f"/v1/tasks/groups/{gid}").json()
        assert set(group["status"]["task_run_status_counts"]) == {"completed", "failed", "cancelled"}


def test_all_behaviours_keep_metadata_everywhere(emulator) -> None:
    """Under every behaviour at once, listings and events echo each run's metadata (`echo`: 1 as 1.0 or "1.0");
    `/result` and GET run echo it too, or leave it out (`nometa`), never another run's."""
    emu = emulator(behaviours="all", seed=8, rate_limit=0)
    with client(emu) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        sent = {}
        while not sent:
            r, body = fetch(
                c, "POST", f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs(30), "default_task_spec": SCHEMA}
            )
            if r is not None and r.status_code == 200:
                sent = set(json.loads(body)["run_ids"])
        time.sleep(1.2)
        streamed, bare = [], []
        for path in (f"/v1/tasks/groups/{gid}/runs", f"/v1/tasks/groups/{gid}/events"):
            _, body = fetch(c, "GET", path)
            streamed += [e["run"] for e in events_of(body) if e["type"] == "task_run.state"]
        for rid in list(sent)[:5]:
            for path in (f"/v1/tasks/runs/{rid}", f"/v1/tasks/runs/{rid}/result"):
                resp, body = fetch(c, "GET", path)
                if resp is not None and resp.status_code == 200:
                    obj = json.loads(body)
                    bare.append(obj.get("run", obj))
    assert len(streamed) > 10 and bare

    def echoed(r: dict[str, Any]) -> bool:
        meta = r["metadata"]
        return meta["enrich_row"].startswith("r") and float(meta["enrich_try"]) == 1

    assert all(echoed(r) for r in streamed)
    assert all(r.get("metadata") is None or echoed(r) for r in bare)


def test_errors_end_some_listings_and_event_streams_after_an_error_event(spec, emulator) -> None:
    """Some runs listings end normally right after an `error` event (part-way, or after the last run), and
    some group events connections carry one; every body stays spec-valid SSE."""
    emu = emulator(behaviours="errors", seed=11)
    with client(emu) as c:
        gid, _ = group_with(c, 30)
        shown = []
        for _ in range(20):
            listing = c.get(f"/v1/tasks/groups/{gid}/runs")
            check_response(spec, listing)
            assert listing.content.endswith(b"\n\n")  # a normal end: only the error event says it is incomplete
            events = events_of(listing.content)
            errors = [e for e in events if e["type"] == "error"]
            assert len(errors) <= 1 and (not errors or events[-1] is errors[0])
            assert all(e["error"]["message"] and e["error"]["ref_id"] for e in errors)
            shown.append((len(events) - len(errors), len(errors)))
        streams = []
        for _ in range(20):
            resp = c.get(f"/v1/tasks/groups/{gid}/events", params={"timeout": 1})
            check_response(spec, resp)
            streams.append(sum(e["type"] == "error" for e in events_of(resp.content)))
    assert {n for n, e in shown if e} - {30} and (30, 0) in shown  # part-way and complete listings
    assert max(streams) == 1 and min(streams) == 0


def test_lost_replies_after_partial_or_full_creation(spec, emulator, monkeypatch) -> None:
    """Some add-runs requests create all or only the first runs of their batch and then answer 503 or reset
    the connection; a listing shows every run that was created, with its metadata."""
    monkeypatch.setattr(bh, "LOST_P", 0.5)
    emu = emulator(behaviours="lost", seed=12, rate_limit=0)
    outcomes: Counter[str] = Counter()
    with client(emu) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        for _ in range(60):
            before = len(httpx.get(emu.base_url + "/_emulator/ledger").json())
            try:
                r = c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs(5), "default_task_spec": SCHEMA})
                check_response(spec, r, generic=True)
                kind = "ok" if r.status_code == 200 else str(r.status_code)
            except httpx.TransportError:
                kind = "reset"
            made = len(httpx.get(emu.base_url + "/_emulator/ledger").json()) - before
            assert made == 5 if kind == "ok" else 1 <= made <= 5
            outcomes[f"{kind} {'all' if made == 5 else 'some'}"] += 1
        listed = events_of(c.get(f"/v1/tasks/groups/{gid}/runs").content)
    assert outcomes["ok some"] == 0
    assert {"503 all", "503 some", "reset all", "reset some"} <= set(outcomes), outcomes
    assert len(listed) == len(httpx.get(emu.base_url + "/_emulator/ledger").json())
    assert all(e["run"]["metadata"]["enrich_row"] for e in listed)


def test_nometa_leaves_metadata_out_of_results_only(spec, emulator) -> None:
    """`/result` and GET run often answer without `metadata` (key absent or null); listings and events keep it."""
    emu = emulator(behaviours="nometa", seed=13)
    with client(emu) as c:
        gid, added = group_with(c, 10)
        bare = []
        for rid in added["run_ids"]:
            for path in (f"/v1/tasks/runs/{rid}/result", f"/v1/tasks/runs/{rid}", f"/v1/tasks/groups/{gid}/runs/{rid}"):
                resp = c.get(path)
                check_response(spec, resp)
                run = resp.json().get("run", resp.json())
                bare.append("absent" if "metadata" not in run else "null" if run["metadata"] is None else "echoed")
        streamed = [
            e["run"]
            for path in (f"/v1/tasks/groups/{gid}/runs", f"/v1/tasks/groups/{gid}/events")
            for e in events_of(c.get(path).content)
            if e["type"] == "task_run.state"
        ]
    assert set(bare) == {"absent", "null", "echoed"}
    assert len(streamed) >= 20 and all(r["metadata"]["enrich_row"] for r in streamed)


def test_expiry_answers_old_cursors_422(spec, emulator, monkeypatch) -> None:
    """A cursor older than CURSOR_TTL_S is answered 422 (validation shape) on both streams; a fresh one, or
    none, is served."""
    monkeypatch.setattr(bh, "CURSOR_TTL_S", 0.5)
    emu = emulator(behaviours="expiry", seed=14)
    with client(emu) as c:
        gid, _ = group_with(c, 5)
        second = c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs(5), "default_task_spec": SCHEMA})
        cursors = {"runs": second.json()["run_cursor"], "events": second.json()["event_cursor"]}
        fresh = [
            c.get(f"/v1/tasks/groups/{gid}/{k}", params={"last_event_id": v, "timeout": 0.2})
            for k, v in cursors.items()
        ]
        time.sleep(0.6)
        old = [
            c.get(f"/v1/tasks/groups/{gid}/{k}", params={"last_event_id": v, "timeout": 0.2})
            for k, v in cursors.items()
        ]
        none = [c.get(f"/v1/tasks/groups/{gid}/{k}", params={"timeout": 0.2}) for k in cursors]
    for resp in fresh + old + none:
        check_response(spec, resp)
    assert [r.status_code for r in fresh + old + none] == [200, 200, 422, 422, 200, 200]
    assert all(r.json()["detail"][0]["loc"] == ["query", "last_event_id"] for r in old)


def test_action_required_until_the_owner_acts(spec, emulator, monkeypatch) -> None:
    """Runs stop in `action_required` (not active, with a warning; /result 408, the group not active, an event
    for the transition) until `POST /_emulator/act`; then they complete."""
    monkeypatch.setattr(bh, "ACTION_P", 0.5)
    emu = emulator(behaviours="action", seed=15)
    with client(emu) as c:
        gid, added = group_with(c, 20)
        runs = [c.get(f"/v1/tasks/runs/{rid}") for rid in added["run_ids"]]
        for r in runs:
            check_response(spec, r)
        held = [r.json() for r in runs if r.json()["status"] == "action_required"]
        assert held and len(held) < 20
        assert all(not r["is_active"] and r["warnings"][-1]["message"] == bh.ACTION_MESSAGE for r in held)
        result = c.get(f"/v1/tasks/runs/{held[0]['run_id']}/result", params={"timeout": 0})
        check_response(spec, result)
        assert result.status_code == 408
        group = c.get(f"/v1/tasks/groups/{gid}").json()["status"]
        assert not group["is_active"] and group["task_run_status_counts"]["action_required"] == len(held)
        events = events_of(c.get(f"/v1/tasks/groups/{gid}/events").content)
        assert {e["run"]["run_id"] for e in events if e["type"] == "task_run.state"} == set(added["run_ids"])
        assert httpx.post(emu.base_url + "/_emulator/act").json() == {"resumed": len(held)}
        time.sleep(0.2)
        after = [c.get(f"/v1/tasks/runs/{r['run_id']}").json()["status"] for r in held]
        assert set(after) == {"completed"}
        assert c.get(f"/v1/tasks/groups/{gid}").json()["status"]["task_run_status_counts"] == {"completed": 20}


def test_echo_returns_metadata_values_as_other_json_types(spec, emulator) -> None:
    """Integer metadata comes back as 1.0 or "1.0", integer strings too; other strings unchanged."""
    emu = emulator(behaviours="echo", seed=16)
    with client(emu) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        body = {"inputs": inputs(4) + [{**i, "metadata": {"enrich_row": "r9", "enrich_try": "2"}} for i in inputs(4)]}
        c.post(f"/v1/tasks/groups/{gid}/runs", json={**body, "default_task_spec": SCHEMA})
        listing = c.get(f"/v1/tasks/groups/{gid}/runs")
        check_response(spec, listing)
        tries = [e["run"]["metadata"]["enrich_try"] for e in events_of(listing.content)]
        rows = {e["run"]["metadata"]["enrich_row"] for e in events_of(listing.content)}
    assert set(tries) == {1.0, "1.0", 2.0, "2.0"} and not any(isinstance(t, int) for t in tries)
    assert rows == {"r0", "r1", "r2", "r3", "r9"}


# ---- processor-dependent quality ------------------------------------------------------------
def _answer(emu: Any, processor: str, company: str = "Apple") -> dict[str, Any]:
    with client(emu) as c:
        rid = c.post(
            "/v1/tasks/runs", json={"input": {"company": company}, "processor": processor, "task_spec": SCHEMA}
        ).json()["run_id"]
        return c.get(f"/v1/tasks/runs/{rid}/result").json()["output"]


def test_tier_column_makes_a_cell_hard(tmp_path, emulator) -> None:
    """`founded_year__tier = core`: lite answers it low, core and pro high; other fields stay high."""
    table = tmp_path / "k.csv"
    table.write_text(
        "company,headquarters_location,founded_year,founded_year__tier\nApple,Cupertino,1976,core\nIBM,Armonk,1911,\n"
    )
    emu = emulator(knowledge=str(table))
    conf = {
        p: {b["field"]: b["confidence"] for b in _answer(emu, p)["basis"]} for p in ("lite", "base", "core", "pro-fast")
    }
    assert [conf[p]["founded_year"] for p in ("lite", "core", "pro-fast")] == ["low", "high", "high"]
    assert conf["base"]["founded_year"] in ("medium", "low")
    assert {conf[p]["headquarters_location"] for p in conf} == {"high"}
    ibm = {b["field"]: b["confidence"] for b in _answer(emu, "lite", "IBM")["basis"]}
    assert ibm["founded_year"] == ibm["headquarters_location"] == "high"  # an empty tier cell: easy
    assert "founded_year__tier" not in _answer(emu, "lite")["content"]


def test_hard_rate_lite_low_core_high_and_deterministic(emulator) -> None:
    """--hard-rate 1: every cell is hard; a cell needing core is low on lite and high on core;
    the same seed grades the same way in another server, another seed differently."""
    k = Knowledge.load(None, "company")
    q = Quality(seed=11, hard_rate=1.0)
    rows = [r for r in COMPANIES if k.match(r)]
    needs_core = [(r, f) for r in rows for f in FIELDS if q.required(norm_value(k.match(r)["company"]), f, None) == 2]
    assert needs_core
    company, field = needs_core[0]
    a, b = emulator(hard_rate=1.0, seed=11), emulator(hard_rate=1.0, seed=11)
    lite = {x["field"]: x for x in _answer(a, "lite", company)["basis"]}
    core = {x["field"]: x for x in _answer(a, "core", company)["basis"]}
    assert lite[field]["confidence"] == "low" and core[field]["confidence"] == "high"
    grades = [[x["confidence"] for x in _answer(e, "lite", c)["basis"]] for e in (a, b) for c in rows]
    assert grades[: len(rows)] == grades[len(rows) :]
    other = emulator(hard_rate=1.0, seed=12)
    assert [[x["confidence"] for x in _answer(other, "lite", c)["basis"]] for c in rows] != grades[: len(rows)]
    none = emulator(hard_rate=0.0, seed=11)
    assert {x["confidence"] for x in _answer(none, "lite", company)["basis"]} <= {"high", "low"}
    ledger = httpx.get(a.base_url + "/_emulator/ledger").json()
    assert {e["processor"] for e in ledger} == {"lite", "core"}


def test_behaviours_are_deterministic_per_seed(emulator) -> None:
    """The same requests to two servers with the same seed get the same id order, endings and basis
    variety; another seed differs. Run ids themselves are unique per server, like the real API's."""

    def observe(seed: int) -> tuple[list[int], list[tuple[str, Any]], set[str]]:
        emu = emulator(behaviours="shuffle,endings,basis", seed=seed)
        with client(emu) as c:
            gid, added = group_with(c, 40)
            listing = events_of(c.get(f"/v1/tasks/groups/{gid}/runs", params={"include_output": "true"}).content)
        position = {e["run"]["run_id"]: i for i, e in enumerate(listing)}  # the listing is in input order
        return (
            [position[r] for r in added["run_ids"]],
            [(e["run"]["status"], e["output"]) for e in listing],
            set(position),
        )

    first, again = observe(9), observe(9)
    assert again[:2] == first[:2] and not (again[2] & first[2])  # same behaviour, never the same run ids
    assert observe(10)[:2] != first[:2]
