"""Scale-out on Ray (enrich/scale): partitions, the governor, merged and dataset outputs, resume.

Fast tests use one local Ray (`ray.init(num_cpus=2)`, shared by the module) and an emulator
process; the slow ones (`make chaos`) start a real two-node cluster on this machine with
`ray start --block` (each node --num-cpus=1, its own temp dir), and stop it by process group.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from enrich.config import load_config
from enrich.errors import ConfigError, InputError
from enrich.job import (
    EXIT_AUTH,
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    run_job,
)
from enrich.journal import Journal
from enrich.processors import PROCESSORS
from enrich.report import run_lines
from enrich.scale.governor import GovernorState
from enrich.scale.merge import MANIFEST
from enrich.scale.partition import cut, parts_dir_for
from enrich.scale.runner import NODE_LOCAL, check_cache, check_shared, run_partitioned, worst
from enrich.spend import utc_day
from tests.conftest import ROOT, EmulatorProcess, run_enrich, wait_for, write_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)

with (ROOT / "enrich" / "data" / "companies_knowledge.csv").open(encoding="utf-8") as _f:
    KNOWN = [r["company"] for r in csv.DictReader(_f)]
FIELDS = {"headquarters_location": "string", "founded_year": "integer"}
PRICE = 0.005  # lite-fast, USD per run


def make_rows(path: Path, n: int, start: int = 0) -> Path:
    """Synthetic rows: a unique id, and companies the emulator knows (so results carry real values)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "company"])
        for i in range(start, start + n):
            w.writerow([f"r{i:06d}", KNOWN[i % len(KNOWN)]])
    return path


def config(d: Path, name: str, inp: Path, output: Path, limits: str = "", budget: float | None = None) -> Path:
    lim = limits + (f"\nbudget_usd = {budget}" if budget is not None else "")
    return write_config(
        d / f"{name}.toml",
        input_path=inp,
        output=output,
        key=["id"],
        columns=["id", "company"],
        fields=FIELDS,
        limits=lim,
    )


def frame(path: Path) -> pl.DataFrame:
    """An output without its run ids and latencies (they differ between runs by construction)."""
    if path.is_dir():
        df = pl.read_parquet(sorted(path.glob("part-*.parquet")))
    elif path.suffix == ".parquet":
        df = pl.read_parquet(path)
    else:
        df = pl.read_csv(path, infer_schema=False)
    return df.drop("_enrich_run_id", "_enrich_latency_s")  # both differ between runs by construction


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        namespace="enrich",
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def emu() -> Iterator[EmulatorProcess]:
    p = EmulatorProcess("--time-scale", "0", "--rate-limit", "0")
    yield p
    p.stop()


# ---- pure parts: no Ray -----------------------------------------------------------------------


def test_governor_paces_posts_globally_without_burst(tmp_path: Path) -> None:
    g = GovernorState(tmp_path, requests_per_minute=120, budget_micros=None)
    waits = [g.post_delay(100.0) for _ in range(5)]  # five partitions ask at the same instant
    assert waits == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert g.post_delay(200.0) == 0.0  # an idle spell gives no burst credit
    assert g.post_delay(200.0) == pytest.approx(0.5)


def test_governor_budget_leases_register_settle_and_rebuild(tmp_path: Path) -> None:
    g = GovernorState(tmp_path, 60, budget_micros=1_000)
    assert g.lease("part-00000", 600, held=0) == (600, "granted")
    assert g.lease("part-00001", 600, held=0) == (400, "granted")  # only what is left
    assert g.lease("part-00002", 10, held=0) == (0, "spent")
    g2 = GovernorState(tmp_path, 60, budget_micros=1_000)  # restarted: the persisted allocations hold
    assert g2.committed == 1_000 and g2.lease("part-00002", 10, held=0) == (0, "spent")
    g2.settle("part-00000", 100)  # finished, spent 100: 500 come back
    assert g2.lease("part-00002", 700, held=0) == (500, "granted")
    g2.register("part-00001", 0)  # a retried attempt: the dead one's lease is freed
    assert g2.lease("part-00001", 10, held=0) == (10, "granted")
    assert g2.committed == 100 + 500 + 10
    assert g2.lease("part-00003", 1_000, held=0) == (390, "granted") and g2.committed == 1_000


def test_governor_covers_every_partitions_first_tier_before_any_escalation(tmp_path: Path) -> None:
    """An escalation lease gets only what is left after every partition's first-tier need; refused, it waits
    while the needy partitions run and makes way when one has not started; settling gives unused money back."""
    g = GovernorState(tmp_path, 60, budget_micros=1_000)
    for part in ("part-00000", "part-00001", "part-00002"):
        g.expect(part, 300)  # 60 first-tier runs at 5 each, say
    g.register("part-00000", 0)
    assert g.lease("part-00000", 300, held=0, least=5, first_tier=True, need=300) == (300, "granted")
    # part 0 climbs: 100 is beyond the others' 600, the rest is theirs (part 2 has not started: make way)
    assert g.lease("part-00000", 250, held=300, least=25, first_tier=False, need=0) == (100, "granted")
    assert g.lease("part-00000", 250, held=400, least=25, first_tier=False, need=0) == (0, "defer")
    g.register("part-00002", 0)
    g.register("part-00001", 0)
    assert g.lease("part-00000", 250, held=400, least=25, first_tier=False, need=0) == (0, "wait")  # both run
    assert g.lease("part-00001", 300, held=0, least=5, first_tier=True, need=300) == (300, "granted")
    assert g.lease("part-00002", 200, held=0, least=5, first_tier=True, need=300) == (200, "granted")
    assert g.lease("part-00000", 250, held=400, least=25, first_tier=False, need=0) == (0, "wait")  # 100 is part 2's
    g.settle("part-00002", 150, need=0)  # done with 50 unused (some rows were cached): it comes back
    assert g.need["part-00002"] == 0 and g.free() == 1_000 - 400 - 300 - 150
    assert g.lease("part-00000", 250, held=400, least=25, first_tier=False, need=0) == (150, "granted")
    assert g.lease("part-00001", 10, held=300, least=5, first_tier=True, need=10) == (0, "spent")


def test_worst_exit_code_ranks_severity() -> None:
    assert worst([EXIT_OK, EXIT_FAILED_ROWS, EXIT_BUDGET]) == EXIT_BUDGET
    assert worst([EXIT_BUDGET, EXIT_INTERRUPTED]) == EXIT_INTERRUPTED
    assert worst([EXIT_INTERRUPTED, EXIT_AUTH, EXIT_OK]) == EXIT_AUTH
    assert worst([EXIT_AUTH, EXIT_USAGE]) == EXIT_USAGE
    assert worst([]) == EXIT_OK


def test_cut_is_deterministic_and_refuses_a_changed_input(tmp_path: Path) -> None:
    inp = make_rows(tmp_path / "in.csv", 103)
    cfg = load_config(config(tmp_path, "c", inp, tmp_path / "out.csv"))
    parts = parts_dir_for(tmp_path / "j.sqlite")
    plan = cut(cfg, parts, 4)
    assert [p.rows for p in plan.partitions] == [26, 26, 26, 25]
    first = [(parts / p.slice).read_bytes() for p in plan.partitions]
    again = cut(cfg, parts, 2)  # a stored cut is kept: the same rows stay in the same partition
    assert [(parts / p.slice).read_bytes() for p in again.partitions] == first
    rows = [r for p in plan.partitions for r in list(csv.reader((parts / p.slice).open()))[1:]]
    assert rows == list(csv.reader(inp.open()))[1:]
    make_rows(inp, 104)
    with pytest.raises(ConfigError, match="changed since this job was partitioned"):
        cut(cfg, parts, 4)


def test_directory_input_one_partition_per_file_and_keys_unique_across_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_rows(src / "a.csv", 30)
    make_rows(src / "b.csv", 20, start=30)
    cfg = load_config(config(tmp_path, "c", src, tmp_path / "out.csv"))
    plan = cut(cfg, tmp_path / "p1", None)
    assert [(Path(p.source).name, p.rows) for p in plan.partitions] == [("a.csv", 30), ("b.csv", 20)]
    make_rows(src / "c.csv", 5, start=25)  # r000025.. repeats a key of a.csv
    with pytest.raises(InputError, match="duplicate key"):
        cut(load_config(config(tmp_path, "c", src, tmp_path / "out.csv")), tmp_path / "p2", None)


def test_multi_node_cluster_refuses_relative_and_node_local_paths(tmp_path: Path) -> None:
    inp = make_rows(tmp_path / "in.csv", 3)
    cfg = load_config(config(tmp_path, "c", inp, Path("out/rel.csv")))
    with pytest.raises(ConfigError, match="relative path"):
        check_shared(cfg, Path("out/rel.csv.journal.sqlite").absolute())
    cfg = load_config(config(tmp_path, "c", inp, Path("/tmp/x/out.csv")))
    with pytest.raises(ConfigError, match="node-local"):
        check_shared(cfg, Path("/tmp/x/out.csv.journal.sqlite"))
    shared = Path("/srv/enrich-shared")  # any path outside node-local storage (it need not exist to be checked)
    cfg = load_config(config(tmp_path, "c", inp, shared / "x.csv"))
    check_shared(cfg, shared / "x.csv.journal.sqlite")


def test_a_results_cache_is_refused_on_a_multi_node_cluster(tmp_path: Path) -> None:
    """A shared cache is one machine's SQLite file: refused (one line, exit 2) when partitions run on several nodes."""
    cfg = load_config(config(tmp_path, "c", make_rows(tmp_path / "in.csv", 3), tmp_path / "out.csv"))
    check_cache(cfg, multi=True)  # no cache: nothing to refuse
    cfg.cache.path = tmp_path / "results.sqlite"
    check_cache(cfg, multi=False)
    with pytest.raises(ConfigError, match=r"several nodes.*--no-cache") as err:
        check_cache(cfg, multi=True)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_partitions_flag_needs_ray(tmp_path: Path) -> None:
    cfg = config(tmp_path, "c", make_rows(tmp_path / "in.csv", 3), tmp_path / "out.csv")
    r = run_enrich("run", str(cfg), "--partitions", "2", "--emulator")
    assert r.returncode == 2 and r.stderr.strip() == "enrich: error: --partitions needs --ray"


def test_an_xlsx_output_is_refused_with_ray_before_anything_starts(tmp_path: Path) -> None:
    """Partitions are merged as CSV or Parquet: an .xlsx output with --ray is one line, exit 2, before Ray starts or
    anything is paid (it used to run every partition, then fail merging with a UnicodeDecodeError traceback)."""
    cfg = config(tmp_path, "x", make_rows(tmp_path / "in.csv", 3), tmp_path / "out.xlsx")
    r = run_enrich("run", str(cfg), "--ray", "--partitions", "2", "--emulator")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("enrich: error: output ") and "not .xlsx" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.xlsx.journal.sqlite.parts").exists()


# ---- on a local Ray ---------------------------------------------------------------------------


def test_partitioned_output_equals_single_process_then_resume_sends_nothing(
    tmp_path: Path, local_ray: None, emu: EmulatorProcess
) -> None:
    inp = make_rows(tmp_path / "in.csv", 400)
    over = {"api.base_url": emu.base_url}
    single = run_job(load_config(config(tmp_path, "single", inp, tmp_path / "single.csv"), over), api_key="k")
    assert single.exit_code == EXIT_OK
    cfg = load_config(config(tmp_path, "multi", inp, tmp_path / "multi.csv"), over)
    res = run_partitioned(cfg, address=None, partitions=3, api_key="k")
    assert res.exit_code == EXIT_OK, res.message
    assert frame(tmp_path / "multi.csv").equals(frame(tmp_path / "single.csv"))
    assert frame(tmp_path / "multi.csv")["founded_year"].null_count() < 400  # real values, not all empty
    report = json.loads((tmp_path / "multi.csv.report.json").read_text())
    assert report["rows"] == 400 and report["partitions"] == 3 and report["spend_usd"] == pytest.approx(400 * PRICE)
    # runs and cost per processor over every partition, as one process reports them (and its summary says them)
    solo = json.loads((tmp_path / "single.csv.report.json").read_text())
    assert report["runs_paid"] == solo["runs_paid"] == 400
    assert {p: c["runs"] for p, c in report["cost_by_processor"].items()} == {
        p: c["runs"] for p, c in solo["cost_by_processor"].items()
    }
    said = run_lines(res.message, res.report)  # what `enrich run --ray` prints, once each
    assert sum(line.strip().startswith(f"paid runs: 400 for ${400 * PRICE:.4f}") for line in said) == 1, said
    st = run_enrich("status", str(tmp_path / "multi.csv.journal.sqlite"), "--json")
    info = json.loads(st.stdout)
    assert info["partitioned"] and info["counts"] == {"done": 400} and len(info["per_partition"]) == 3
    posts = emu.stats()["creating_posts"]
    again = run_partitioned(cfg, address=None, partitions=None, api_key="k")  # finished partitions are skipped
    assert again.exit_code == EXIT_OK and emu.stats()["creating_posts"] == posts
    assert frame(tmp_path / "multi.csv").equals(frame(tmp_path / "single.csv"))
    plan = run_enrich("plan", str(config(tmp_path, "multi", inp, tmp_path / "multi.csv")))
    assert "partitions           3" in plan.stdout and "to submit            0" in plan.stdout


def test_partitions_on_a_local_ray_share_the_results_cache(
    tmp_path: Path, local_ray: None, emu: EmulatorProcess
) -> None:
    """On a local Ray every partition reads and writes the job's cache: a second partitioned job (another
    output and journal) over the same rows pays for none of them, and its rows carry the first job's run ids."""
    inp = make_rows(tmp_path / "in.csv", 300)
    over = {"api.base_url": emu.base_url, "cache.path": str(tmp_path / "results.sqlite")}
    first = run_partitioned(
        load_config(config(tmp_path, "a", inp, tmp_path / "a.csv"), over), address=None, partitions=3, api_key="k"
    )
    assert first.exit_code == EXIT_OK, first.message
    posts = emu.stats()["creating_posts"]
    second = run_partitioned(
        load_config(config(tmp_path, "b", inp, tmp_path / "b.csv"), over), address=None, partitions=2, api_key="k"
    )
    assert second.exit_code == EXIT_OK, second.message
    assert emu.stats()["creating_posts"] == posts
    a = pl.read_csv(tmp_path / "a.csv", infer_schema=False)
    b = pl.read_csv(tmp_path / "b.csv", infer_schema=False)
    assert b["_enrich_run_id"].to_list() == a["_enrich_run_id"].to_list()
    assert frame(tmp_path / "b.csv").equals(frame(tmp_path / "a.csv"))


def test_export_review_and_calibrate_of_a_ray_jobs_journal_name_its_partition_journals(
    tmp_path: Path, local_ray: None, emu: EmulatorProcess
) -> None:
    """export, review apply and calibrate given a --ray job (journal or config) exit 2 naming a partition journal."""
    inp = make_rows(tmp_path / "in.csv", 40)
    cfg = config(tmp_path, "p", inp, tmp_path / "p.csv")
    res = run_partitioned(load_config(cfg, {"api.base_url": emu.base_url}), address=None, partitions=2, api_key="k")
    assert res.exit_code == EXIT_OK, res.message
    journal = str(tmp_path / "p.csv.journal.sqlite")
    part = str(parts_dir_for(Path(journal)) / "part-00000.sqlite")
    review = str(parts_dir_for(Path(journal)) / "part-00000.review.csv")
    for args in (
        ("export", journal, "--output", str(tmp_path / "again.csv")),
        ("calibrate", journal),
        ("review", "apply", str(cfg), review),
    ):
        r = run_enrich(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "one journal per partition" in r.stderr and part in r.stderr, r.stderr
    assert run_enrich("export", part, "--output", str(tmp_path / "again.csv")).returncode == 0  # as it says


def test_directory_output_is_a_dataset_with_a_manifest(tmp_path: Path, local_ray: None, emu: EmulatorProcess) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_rows(src / "a.csv", 120)
    make_rows(src / "b.csv", 80, start=120)
    make_rows(tmp_path / "all.csv", 200)
    over = {"api.base_url": emu.base_url}
    assert (
        run_job(
            load_config(config(tmp_path, "s", tmp_path / "all.csv", tmp_path / "s.parquet"), over), api_key="k"
        ).exit_code
        == EXIT_OK
    )
    out = tmp_path / "dataset"
    res = run_partitioned(load_config(config(tmp_path, "d", src, out), over), address=None, partitions=4, api_key="k")
    assert res.exit_code == EXIT_OK, res.message
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == 200 and manifest["partitions"] == 4
    assert [f["file"] for f in manifest["files"]] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"part-{i:05d}.parquet" for i in range(4)), MANIFEST])
    assert frame(out).equals(frame(tmp_path / "s.parquet"))


def test_budget_binds_across_partitions(tmp_path: Path, local_ray: None, emu: EmulatorProcess) -> None:
    inp = make_rows(tmp_path / "in.csv", 400)
    budget = 250 * PRICE
    cfg = load_config(
        config(tmp_path, "b", inp, tmp_path / "b.csv", "batch_size = 20", budget=budget), {"api.base_url": emu.base_url}
    )
    res = run_partitioned(cfg, address=None, partitions=4, api_key="k")
    assert res.exit_code == EXIT_BUDGET, res.message
    ledger = emu.ledger()
    cost = sum(e["price_micros"] for e in ledger) / 1e6
    assert cost <= budget + 1e-9 and res.report["spend_usd"] == pytest.approx(cost)
    assert len(ledger) >= 200  # leases in chunks strand little: most of the budget is used
    out = frame(tmp_path / "b.csv")
    assert out["id"].to_list() == [f"r{i:06d}" for i in range(400)]
    assert Counter(out["_enrich_status"].to_list())["completed"] == len(ledger)


def test_escalate_max_rows_caps_the_whole_job_not_each_partition(tmp_path: Path, local_ray: None) -> None:
    """`[escalate] max_rows = 10` with three partitions: 10 rows climb in all, not 10 in each (found by the
    adversarial trial: 30 climbed)."""
    emu = EmulatorProcess("--time-scale", "0", "--rate-limit", "0", "--hard-rate", "0.5")
    try:
        inp = make_rows(tmp_path / "in.csv", 150)
        path = config(tmp_path, "m", inp, tmp_path / "m.csv", "batch_size = 20")
        path.write_text(path.read_text() + '\n[escalate]\nprocessors = ["base"]\non = ["review"]\nmax_rows = 10\n')
        cfg = load_config(path, {"api.base_url": emu.base_url})
        res = run_partitioned(cfg, address=None, partitions=3, api_key="k")
        assert res.exit_code == EXIT_OK, res.message
        steps = Counter(e["processor"] for e in emu.ledger())
        assert steps == {"lite-fast": 150, "base": 10}, steps
    finally:
        emu.stop()


def test_a_daily_budget_binds_the_whole_job_not_each_partition(
    tmp_path: Path, local_ray: None, emu: EmulatorProcess
) -> None:
    """A daily budget on a --ray job is held by the governor: 4 partitions together stay within one day's
    budget (not one each), exit 4 says daily budget, a shared ledger ends up holding what was reserved; the
    second job, in the forced network mode, says so in its report and status."""
    inp = make_rows(tmp_path / "in.csv", 160)
    daily = 30 * PRICE
    shared = tmp_path / "spend.sqlite"
    limits = f'batch_size = 10\ndaily_budget_usd = {daily}\nspend_ledger = "{shared}"'
    cfg = load_config(config(tmp_path, "d", inp, tmp_path / "d.csv", limits), {"api.base_url": emu.base_url})
    res = run_partitioned(cfg, address=None, partitions=4, api_key="k")
    assert res.exit_code == EXIT_BUDGET, res.message
    assert "daily budget reached" in res.message
    cost = sum(e["price_micros"] for e in emu.ledger())
    assert 0 < cost <= daily * 1e6 and res.report["spend_usd"] == pytest.approx(cost / 1e6)
    view = Journal.open(":memory:")
    view.attach_ledger(shared, "another job")
    assert view.spent_on_day(utc_day(time.time())) == cost  # the unused day lease came back
    view.close()
    limits = f'batch_size = 10\ndaily_budget_usd = {daily}\njournal_mode = "network"'
    no_ledger = load_config(config(tmp_path, "n", inp, tmp_path / "n.csv", limits), {"api.base_url": emu.base_url})
    res = run_partitioned(no_ledger, address=None, partitions=4, api_key="k")
    assert res.exit_code == EXIT_BUDGET and res.report["journal_mode"] == "network"
    assert sum(e["price_micros"] for e in emu.ledger()) - cost <= daily * 1e6  # the day counted over all partitions
    info = json.loads(run_enrich("status", str(tmp_path / "n.csv.journal.sqlite"), "--json").stdout)
    assert info["journal_mode"] == "network" and {e["journal_mode"] for e in info["per_partition"]} == {"network"}


def test_global_post_rate_holds_with_four_partitions_at_once(
    tmp_path: Path, local_ray: None, emu: EmulatorProcess
) -> None:
    rpm = 600
    inp = make_rows(tmp_path / "in.csv", 480)
    cfg = load_config(
        config(tmp_path, "r", inp, tmp_path / "r.csv", f"batch_size = 5\nrequests_per_minute = {rpm}"),
        {"api.base_url": emu.base_url},
    )
    res = run_partitioned(cfg, address=None, partitions=4, api_key="k")
    assert res.exit_code == EXIT_OK, res.message
    posts = sorted(
        t
        for t, method, route, status in emu.get("/_emulator/requests")
        if method == "POST" and route in ("add_runs", "create_run")
    )
    assert len(posts) >= 96  # 480 rows in batches of at most 5
    assert max_in_window(posts, 5.0) <= rpm / 60 * 5 * 1.1 + 1
    assert (len(posts) - 1) / (posts[-1] - posts[0]) * 60 <= rpm * 1.1


def max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# ---- a real two-node cluster on this machine (slow) -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwoNodeCluster:
    """`ray start --head` + `ray start --address`, one CPU each, in the foreground (--block) in their own
    process groups, so teardown stops exactly these processes."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit
        self.log = (self.tmp / "nodes.log").open("w")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        ray_bin = str(Path(sys.executable).parent / "ray")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster: no token to hand around
        common = [
            "--block",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            "--object-store-memory=100000000",
        ]
        self.nodes = [
            subprocess.Popen(
                [
                    ray_bin,
                    "start",
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=false",
                    f"--temp-dir={self.tmp / 'head'}",
                    *common,
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        ]
        try:
            wait_for(lambda: self.alive() >= 1, timeout=90, interval=1)
            self.nodes.append(
                subprocess.Popen(
                    [ray_bin, "start", f"--address={self.address}", *common],
                    stdout=self.log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            )
            wait_for(lambda: self.alive() >= 2, timeout=90, interval=1)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> int:
        code = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0

    def processes(self, needle: str) -> list[int]:
        """Pids descending from this cluster's node processes whose command line contains `needle`."""
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        ours = {p.pid for p in self.nodes}
        grown = True
        while grown:
            more = {pid for pid, pp in parent.items() if pp in ours} - ours
            grown = bool(more)
            ours |= more
        found = []
        for pid in sorted(ours):
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(pid)
        return found

    def stop(self) -> None:
        """SIGTERM our process groups, a grace period, then SIGKILL whatever is left in them."""
        for p in reversed(self.nodes):
            with_signal(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.nodes:
            with_signal(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.log.close()
        subprocess.run(["rm", "-rf", str(self.tmp)], check=False)


def with_signal(p: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodeCluster]:
    c = TwoNodeCluster()
    yield c
    c.stop()


def _not_node_local() -> Path:
    """A writable folder outside node-local storage: the checkout's out/ when the checkout is not under /tmp,
    else one under the home folder (the repository may be cloned anywhere)."""
    for base in (ROOT / "out", Path.home() / ".cache" / "enrich-tests"):
        real = os.path.realpath(base)
        if any(real == p or real.startswith(p + "/") for p in NODE_LOCAL):
            continue
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        return base
    pytest.skip("no writable folder outside node-local storage (/tmp, /var/tmp, /dev/shm, /run) for a multi-node job")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """Journals and outputs for a multi-node job: not node-local (/tmp is refused there)."""
    d = Path(tempfile.mkdtemp(prefix="ray-test-", dir=_not_node_local()))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.mark.slow
def test_two_node_cluster_20000_rows_equal_single_process(cluster: TwoNodeCluster, shared_dir: Path) -> None:
    emu = EmulatorProcess("--time-scale", "0", "--rate-limit", "0")
    try:
        inp = make_rows(shared_dir / "in.csv", 20_000)
        single = config(shared_dir, "single", inp, shared_dir / "single.parquet", "max_in_flight = 5000")
        assert run_enrich("run", str(single), "--base-url", emu.base_url).returncode == 0
        multi = config(shared_dir, "multi", inp, shared_dir / "multi.parquet", "max_in_flight = 5000")
        r = run_enrich("run", str(multi), "--ray", cluster.address, "--partitions", "4", "--base-url", emu.base_url)
        assert r.returncode == 0, r.stderr[-3000:]
        assert frame(shared_dir / "multi.parquet").equals(frame(shared_dir / "single.parquet"))
        parts = parts_dir_for(shared_dir / "multi.parquet.journal.sqlite")
        markers = [json.loads(p.read_text()) for p in sorted(parts.glob("part-*.done.json"))]
        assert len(markers) == 4 and len({m["node"] for m in markers}) == 2  # both nodes did work
        # node-local paths are refused when joining a multi-node cluster: exit 2, one line
        bad = config(shared_dir, "bad", inp, Path(tempfile.gettempdir()) / "enrich-ray-bad.csv")
        r = run_enrich("run", str(bad), "--ray", cluster.address, "--base-url", emu.base_url)
        assert r.returncode == 2 and "node-local" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        emu.stop()


@pytest.mark.slow
@pytest.mark.parametrize("journal_mode", ["local", "network"])
def test_kill_a_worker_then_the_driver_then_resume_exactly_once(
    cluster: TwoNodeCluster, shared_dir: Path, journal_mode: str
) -> None:
    """A worker SIGKILLed, then the driver, then the same command again: no row paid twice, the budget holds,
    every row once in order; with the network mode forced, every partition journal is a rollback journal."""
    rows, budget_rows = 6000, 4000
    budget = budget_rows * PRICE
    emu = EmulatorProcess("--time-scale", "0.02", "--rate-limit", "0", "--seed", "3")
    try:
        inp = make_rows(shared_dir / "in.csv", rows)
        cfg = config(
            shared_dir,
            "k",
            inp,
            shared_dir / "k.csv",
            f'batch_size = 100\nrequests_per_minute = 150\njournal_mode = "{journal_mode}"',
            budget=budget,
        )
        cmd = [
            sys.executable,
            "-m",
            "enrich",
            "run",
            str(cfg),
            "--ray",
            cluster.address,
            "--partitions",
            "4",
            "--base-url",
            emu.base_url,
        ]
        env = {**os.environ, "PARALLEL_API_KEY": "k"}
        log = (shared_dir / "driver.log").open("w")
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: len(emu.ledger()) >= 600, timeout=120, interval=0.2)
        workers = wait_for(lambda: cluster.processes("run_partition"), timeout=30)
        os.kill(workers[0], signal.SIGKILL)  # a worker dies mid-run: Ray retries it
        seen = len(emu.ledger())
        wait_for(lambda: len(emu.ledger()) >= seen + 600, timeout=120, interval=0.2)
        driver.kill()  # then the driver
        driver.wait(30)
        log.close()
        assert len(emu.ledger()) < budget_rows, "the job finished before the driver was killed"
        r = run_enrich("run", *cmd[4:], timeout=600, key="k")
        assert r.returncode == EXIT_BUDGET, r.stderr[-3000:]
        ledger = emu.ledger()
        by_row = Counter((e["metadata"]["enrich_row"], e["processor"]) for e in ledger)
        by_input = Counter((e["input"]["id"], e["processor"]) for e in ledger)
        assert max(by_row.values()) == 1 and max(by_input.values()) == 1  # no row was paid for twice
        cost = sum(e["price_micros"] for e in ledger) / 1e6
        report = json.loads((shared_dir / "k.csv.report.json").read_text())
        assert cost <= budget + 1e-9 and report["spend_usd"] == pytest.approx(cost)
        out = frame(shared_dir / "k.csv")
        assert out["id"].to_list() == [f"r{i:06d}" for i in range(rows)]  # every row exactly once, in order
        statuses = Counter(out["_enrich_status"].to_list())
        assert statuses["completed"] == len(ledger) and statuses["skipped_budget"] == rows - len(ledger)
        parts = parts_dir_for(shared_dir / "k.csv.journal.sqlite")
        modes = set()
        for j in sorted(parts.glob("part-*.sqlite")):
            view = Journal.open(j, readonly=True)
            modes.add(view.sqlite_mode())
            view.close()
        assert modes == {"delete" if journal_mode == "network" else "wal"}
        assert report["journal_mode"] == journal_mode
        if journal_mode == "network":
            assert not [p.name for p in parts.iterdir() if p.name.endswith(("-wal", "-shm"))]
    finally:
        emu.stop()


@pytest.mark.slow
@pytest.mark.parametrize("partitions", [3, 6])
def test_a_binding_budget_researches_every_row_before_any_escalation(
    cluster: TwoNodeCluster, shared_dir: Path, sp500: Path, partitions: int
) -> None:
    """S&P 500 on $5 with a base/core ladder: every row of every partition gets its first-tier run, escalation
    steps take the rest, and less than one more step is left unspent (6 partitions: more than run at once)."""
    emu = EmulatorProcess(
        *("--knowledge", str(sp500), "--knowledge-key", "Security", "--hard-rate", "0.25"),
        *("--time-scale", "0", "--rate-limit", "0", "--seed", "5"),
    )
    try:
        cfg = write_config(
            shared_dir / "sp.toml",
            input_path=sp500,
            output=shared_dir / "sp.csv",
            key=["Symbol"],
            columns=["Security"],
            fields={"headquarters_location": "string", "founded": "string"},
            limits="budget_usd = 5.0\nmax_in_flight = 100",
        )
        cfg.write_text(cfg.read_text() + '\n[escalate]\nprocessors = ["base", "core"]\non = ["rejected"]\n')
        args = ["--ray", cluster.address, "--partitions", str(partitions), "--base-url", emu.base_url]
        r = run_enrich("run", str(cfg), *args, timeout=600, key="k")
        ledger = emu.ledger()
    finally:
        emu.stop()
    assert r.returncode == EXIT_BUDGET, r.stderr[-3000:]
    first = Counter(e["metadata"]["enrich_row"] for e in ledger if e["processor"] == "lite-fast")
    assert len(first) == 503 and max(first.values()) == 1  # every row researched, once
    spent = sum(e["price_micros"] for e in ledger)
    report = json.loads((shared_dir / "sp.csv.report.json").read_text())
    assert spent <= 5_000_000 and report["spend_usd"] == pytest.approx(spent / 1e6)
    pending = Counter[str]()
    for j in parts_dir_for(shared_dir / "sp.csv.journal.sqlite").glob("part-*.sqlite"):
        view = Journal.open(j, readonly=True)
        pending.update(view.pending_by_processor(view.get("epoch")))
        view.close()
    assert pending and set(pending) <= {"base", "core"}  # what the budget left undone is escalation steps only
    assert 5_000_000 - spent < min(PROCESSORS[p].price_micros for p in pending)  # nothing that fits is left
    assert Counter(frame(shared_dir / "sp.csv")["_enrich_status"].to_list()) == {"completed": 503}
    last = r.stderr.strip().splitlines()[-1]
    assert "skipped_budget" not in last and f"{sum(pending.values())} escalation steps not run" in last, last
    plan = run_enrich("plan", str(cfg)).stdout  # the steps left are priced, and none of them fits
    assert "to submit            0  x lite-fast" in plan and "escalation steps" in plan and "room for 0 of the" in plan
