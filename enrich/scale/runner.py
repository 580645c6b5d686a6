"""`run_partitioned()`: one job over many processes or machines, what `enrich run --ray` calls.

    1. connect to Ray (start a local one, or join `auto` / `ray://...`); on a multi-node cluster
       refuse journal/output paths that not every node can reach (relative, /tmp...)
    2. cut the input into partitions once (partition.py), or reuse the cut
    3. start the job's governor actor (governor.py): global POST rate and budget
    4. run each unfinished partition as a Ray task: `job.run_job` on its slice, with its own
       journal `<journal>.parts/part-NNNNN.sqlite`; at most K run at once (K = cluster CPUs /
       PARTITION_CPUS), each with limits.max_in_flight // K runs in flight, so the job never
       has more than limits.max_in_flight; Ray retries a task whose worker died (max_retries)
       and the retry resumes the same journal. With a budget, the governor covers every
       partition's first tier before any escalation step; partitions that stopped for the
       budget (or made way for others' first tier) run again, in rounds, while a round spent
       something and what is left still pays for one of their runs
    5. merge the partition outputs into the output file (input order), or keep the dataset's
       manifest current as partitions finish (merge.py)

The exit code is the worst partition's (SEVERITY). Finished partitions (exit 0, same slice and
task) are skipped on the next run; everything else resumes from its journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from enrich import preflight
from enrich.config import RunConfig, build_task_spec, digest, spec_fingerprint
from enrich.errors import (
    EXIT_AUTH,
    EXIT_BUDGET,
    EXIT_DISK,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ConfigError,
    EnrichError,
    JournalError,
)
from enrich.files import XLSX_SUFFIXES, atomic_json, report_json_path
from enrich.job import JobResult, left_undone, run_job
from enrich.processors import PROCESSORS, strength
from enrich.report import UNATTRIBUTED
from enrich.scale.governor import (
    ActorGovernor,
    GovernorState,
    close_day,
    journal_paid_by_processor,
    journal_pending,
    journal_spend,
    open_day,
)
from enrich.scale.merge import copy_into_dataset, is_dataset, merge_files, read_manifest, write_manifest
from enrich.scale.partition import Partition, PartitionPlan, cut, load_plan, parts_dir_for
from enrich.storage import detect, one_mode, resolve

PARTITION_CPUS = 0.5  # Ray CPUs per partition task: 2 cores run 4 partitions (they mostly wait on I/O)
TASK_RETRIES = 3  # Ray re-runs a partition whose worker or node died; it resumes the same journal
NAMESPACE = "enrich"
PARTITION_STOP_S = 60  # after Ctrl-C: how long partitions get to record what is in flight and write their output
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")
# how long a retried partition waits for a dead attempt's journal lock: on shared storage, longer than an NFSv4
# lease (90 s by default), after which the server frees the locks of a client that died with its node
LOCK_WAIT_S = {"local": 60.0, "network": 180.0}
# worst first: nothing more can work (usage, auth) > resumable stops > budget > failed rows > ok
SEVERITY = [
    EXIT_USAGE,
    EXIT_AUTH,
    EXIT_DISK,
    EXIT_UNAVAILABLE,
    EXIT_INTERRUPTED,
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_OK,
]


def worst(codes: list[int]) -> int:
    """The job's exit code: the most severe of its partitions' (SEVERITY; unknown codes rank first)."""
    rank = {c: i for i, c in enumerate(SEVERITY)}
    return min(codes, key=lambda c: rank.get(c, -1)) if codes else EXIT_OK


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'enrich[ray]'") from None
    return ray


def connect(address: str | None) -> tuple[bool, bool]:
    """Start a local Ray (address None) or join a cluster. Returns (started here, multi-node)."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": True}
        if address is None:
            kw.update(num_cpus=os.cpu_count() or 1, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
        try:
            ray.init(address=address, namespace=NAMESPACE, **kw)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray {address or ''}: cannot start or join Ray: {str(exc).splitlines()[0]}") from None
        started = True
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    multi = len(nodes) > 1 or str(address or "").startswith("ray://")
    return started, multi


def check_shared(cfg: RunConfig, journal: Path) -> None:
    """On a multi-node cluster every node writes journals and outputs: refuse relative or node-local paths."""
    for what, given in (("output", cfg.output.path), ("journal", cfg.journal or journal)):
        if not Path(given).is_absolute():
            raise ConfigError(
                f"{what} {given}: a relative path is not the same place on every node of a multi-node "
                "cluster; give an absolute path on storage every node mounts"
            )
        real = os.path.realpath(given)
        if any(real == p or real.startswith(p + "/") for p in NODE_LOCAL):
            raise ConfigError(
                f"{what} {given}: {real} is node-local storage; on a multi-node cluster journals and "
                "outputs must live on storage every node mounts (a shared filesystem)"
            )
    if detect(journal).local_locks:
        raise ConfigError(
            f"journal {journal}: its NFS mount keeps locks on each host (nolock or local_lock), so a node would not "
            "see that another one holds a partition journal; remount it with local_lock=none (the default)"
        )


def check_cache(cfg: RunConfig, multi: bool) -> None:
    """A results cache is supported on a local Ray (every partition on this machine uses the one file); on a
    multi-node cluster it is refused: SQLite's locking does not hold across machines or network filesystems."""
    if multi and cfg.cache.path is not None:
        raise ConfigError(
            f"[cache] path {cfg.cache.path}: a results cache is a SQLite file for the processes of one machine "
            "(its locking does not hold across machines or network filesystems), and this Ray cluster has "
            "several nodes; run without it (--no-cache), or on a local Ray (--ray without an address)"
        )


def _fingerprint(cfg: RunConfig) -> str:
    """What a finished partition's rows depend on besides its slice: task, processors, columns, output form."""
    spec = build_task_spec(cfg)
    return digest(
        [
            spec_fingerprint(cfg, spec),
            cfg.ladder,
            cfg.input.key,
            cfg.input.input_columns,
            cfg.output.reasoning,
            cfg.output.formula_guard,
            cfg.output.path.suffix.lower(),
        ]
    )


def partition_config(cfg: RunConfig, plan: PartitionPlan, p: Partition, in_flight: int, dataset: bool) -> RunConfig:
    """The partition's own job: its slice as input, its journal and output under the parts dir."""
    pc = cfg.model_copy(deep=True)
    pc.input.path = plan.slice_path(p)
    pc.input.encoding = "utf-8"
    ext = ".parquet" if dataset else (cfg.output.path.suffix or ".csv")
    pc.output.path = plan.parts_dir / f"{p.name}{ext}"
    pc.journal = plan.journal(p)
    pc.limits.max_in_flight = in_flight
    # the governor holds the daily budget for every partition (open_day): none opens the spend ledger itself
    pc.limits.daily_budget_usd = None
    pc.limits.spend_ledger = None
    if pc.cache.path is not None:  # the same file for every partition, whatever their working directory
        pc.cache.path = pc.cache.path.resolve()
    if pc.escalate is not None and pc.escalate.max_rows is not None:  # a cap on the job, not on each partition
        pc.escalate.max_rows = rows_share(
            pc.escalate.max_rows, [q.rows for q in plan.partitions], plan.partitions.index(p)
        )
    return pc


def rows_share(total: int, sizes: list[int], index: int) -> int:
    """Partition `index`'s share of a count over the whole job (`[escalate] max_rows`), by its rows, the remainder
    to the largest fractions (then the first partitions): the shares sum to `total`, the same on every resume.

    >>> [rows_share(10, [168, 168, 167], i) for i in range(3)]
    [4, 3, 3]
    """
    whole = sum(sizes) or 1
    exact = [total * n / whole for n in sizes]
    shares = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares[index]


def _wait_for_lock(path: Path, timeout: float) -> None:
    """A retried partition waits until a dying earlier attempt has let go of its journal."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return  # run_job reports the journal as in use (exit 2)
                time.sleep(0.5)
    finally:
        os.close(fd)


def first_tier_need(cfg: RunConfig, journal: Path, rows: int) -> int:
    """Micro-dollars a partition's first-tier rows still need: its pending rows on the ladder's first processor
    (every row when its journal does not exist yet, an upper bound: some may be reused from results)."""
    base = cfg.ladder[0]
    pending = journal_pending(journal) if journal.is_file() else {base: rows}
    return pending.get(base, 0) * PROCESSORS[base].price_micros


def run_partition(
    pcfg: RunConfig,
    part: str,
    governor: Any,
    *,
    rows: int,
    api_key: str,
    emulated: bool,
    retry_failed: bool,
    adopt: bool,
    cache_reads: bool = True,
) -> dict[str, Any]:
    """Body of one partition's Ray task: register with the governor, run_job, settle. Returns a summary."""
    assert pcfg.journal is not None
    mode = resolve(pcfg.limits.journal_mode, pcfg.journal).mode  # run_job resolves the same on this node
    _wait_for_lock(pcfg.journal, LOCK_WAIT_S[mode])
    baseline = journal_spend(pcfg.journal)
    _ray().get(governor.register.remote(part, baseline))
    price = max(PROCESSORS[p].price_micros for p in pcfg.ladder)
    # ask for at most one batch (and never for more runs than the partition has rows)
    adapter = ActorGovernor(governor, part, baseline, max_ask=price * min(pcfg.limits.batch_size, rows))
    try:
        result = run_job(
            pcfg,
            api_key=api_key,
            emulated=emulated,
            retry_failed=retry_failed,
            adopt=adopt,
            install_signals=False,
            governor=adapter,
            cache_reads=cache_reads,
        )
        out = {
            "exit_code": result.exit_code,
            "message": result.message,
            "counts": result.counts,
            "status_counts": result.report.get("status_counts", {}),
            "rows": result.report.get("rows", 0),
            "spend_usd": result.report.get("spend_usd", 0.0),
            "emulated": bool(result.report.get("emulated")),
            "output": str(result.output),
            "deferred": result.deferred,
            "journal_mode": result.report.get("journal_mode"),
        }
    except EnrichError as exc:
        out = {"exit_code": exc.exit_code, "message": str(exc), "rows": 0, "output": None}
    _ray().get(governor.settle.remote(part, journal_spend(pcfg.journal), first_tier_need(pcfg, pcfg.journal, rows)))
    out["creating_posts"] = adapter.posts
    out["node"] = _ray().get_runtime_context().get_node_id()
    return out


_REMOTE: dict[str, Any] = {}


def _remotes() -> tuple[Any, Any]:
    """The governor actor class and the partition task, defined once Ray is imported."""
    if not _REMOTE:
        ray = _ray()

        @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)
        class GovernorActor:
            """One per job (named after the journal): GovernorState behind async methods."""

            def __init__(
                self,
                parts_dir: str,
                requests_per_minute: int,
                budget_micros: int | None,
                daily: tuple[int, int] | None = None,
            ):
                self.state = GovernorState(parts_dir, requests_per_minute, budget_micros, daily=daily)

            async def permit_post(self) -> None:
                import asyncio

                delay = self.state.post_delay(time.monotonic())
                if delay > 0:
                    await asyncio.sleep(delay)

            async def lease(
                self, part: str, micros: int, held: int, least: int, first_tier: bool, need: int
            ) -> tuple[int, str, str]:
                grant, verdict = self.state.lease(part, micros, held, least, first_tier, need)
                return grant, verdict, "" if grant else self.state.explain(verdict)

            async def expect(self, part: str, need: int) -> None:
                self.state.expect(part, need)

            async def register(self, part: str, baseline: int) -> None:
                self.state.register(part, baseline)

            async def settle(self, part: str, spent: int, need: int) -> None:
                self.state.settle(part, spent, need)

            async def free(self) -> int | None:
                return self.state.free()

            async def snapshot(self) -> dict[str, Any]:
                return self.state.snapshot()

        _REMOTE["actor"] = GovernorActor
        _REMOTE["task"] = ray.remote(max_retries=TASK_RETRIES, num_cpus=PARTITION_CPUS)(run_partition)
    return _REMOTE["actor"], _REMOTE["task"]


class _Lock:
    """The driver's lock on a partitioned job (`<journal>.parts.lock`): one driver per job."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise JournalError(
                f"{path}: this partitioned job is being run by another enrich process; wait for it "
                "to finish or stop it (its progress is kept)"
            ) from None

    def close(self) -> None:
        os.close(self.fd)


def run_partitioned(
    cfg: RunConfig,
    *,
    address: str | None,
    partitions: int | None,
    api_key: str,
    emulated: bool = False,
    retry_failed: bool = False,
    adopt: bool = False,
    fresh: bool = False,
) -> JobResult:
    """Run (or resume) a job as partitions on Ray; see the module docstring. Raises only EnrichError."""
    if partitions is not None and partitions < 1:
        raise ConfigError("--partitions must be at least 1")
    jpath = Path(os.path.abspath(cfg.journal_path))
    dataset = is_dataset(cfg.output.path)
    if cfg.output.path.suffix.lower() in XLSX_SUFFIXES:  # partitions are merged as CSV or Parquet, never a workbook
        raise ConfigError(
            f"output {cfg.output.path}: --ray writes .csv, .parquet or a Parquet dataset (a folder), not .xlsx; "
            "use .csv (Excel opens it) or .parquet, or run without --ray for a workbook"
        )
    if not dataset:  # a file output gets every single-machine check; a dataset folder is made here
        preflight.check_job(cfg, api_key=api_key, emulated=emulated, journal_path=jpath)
    elif jpath.resolve() == cfg.input.path.resolve():
        raise ConfigError(f"journal {jpath} is the input file; choose another journal path")
    else:
        preflight.check_spend_ledger(cfg.limits.spend_ledger)
    if dataset and cfg.output.path.exists() and not cfg.output.path.is_dir():
        raise ConfigError(f"output {cfg.output.path} is a file; a dataset output must be a directory")
    started, multi = connect(address)
    try:
        if multi and address is not None:
            check_shared(cfg, jpath)
        check_cache(cfg, multi)
        lock = _Lock(jpath.with_name(jpath.name + ".parts.lock"))
        try:
            return _run(cfg, jpath, dataset, partitions, api_key, emulated, retry_failed, adopt, fresh)
        finally:
            lock.close()
    finally:
        if started:
            _ray().shutdown()


def _run(
    cfg: RunConfig,
    jpath: Path,
    dataset: bool,
    partitions: int | None,
    api_key: str,
    emulated: bool,
    retry_failed: bool,
    adopt: bool,
    fresh: bool,
) -> JobResult:
    ray = _ray()
    parts = parts_dir_for(jpath)
    if fresh:
        shutil.rmtree(parts, ignore_errors=True)
        if dataset:
            shutil.rmtree(cfg.output.path, ignore_errors=True)
    reused = load_plan(parts) is not None
    plan = cut(cfg, parts, partitions)
    if reused and partitions is not None and partitions != len(plan.partitions):
        print(
            f"enrich: keeping the existing cut of {len(plan.partitions)} partitions ({parts}); --fresh cuts again",
            file=sys.stderr,
        )
    fingerprint = _fingerprint(cfg)
    todo = [
        p
        for p in plan.partitions
        if not _finished(plan, p, fingerprint, retry_failed or cfg.task.refresh_after_days is not None)
    ]
    cpus = float(ray.cluster_resources().get("CPU", 1))
    k = max(1, min(len(todo) or 1, int(cpus / PARTITION_CPUS)))
    share = max(1, cfg.limits.max_in_flight // k)
    actor_cls, task = _remotes()
    journals = [plan.journal(p) for p in plan.partitions]
    day = open_day(cfg, str(jpath), journals, time.time())  # before anything is paid: the governor holds it
    try:
        daily = None if day is None or day.budget is None or day.ceiling is None else (day.budget, day.ceiling)
        name = "enrich-governor-" + digest(str(jpath), 16)
        governor = actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
            str(parts), cfg.limits.requests_per_minute, cfg.budget_micros, daily
        )
        return _run_rounds(
            cfg, plan, todo, k, share, governor, task, dataset, api_key, emulated, retry_failed, adopt, fresh
        )
    finally:
        close_day(day, journals, time.time())


def _run_rounds(
    cfg: RunConfig,
    plan: PartitionPlan,
    todo: list[Partition],
    k: int,
    share: int,
    governor: Any,
    task: Any,
    dataset: bool,
    api_key: str,
    emulated: bool,
    retry_failed: bool,
    adopt: bool,
    fresh: bool,
) -> JobResult:
    """Run the partitions to their end, in rounds (see the module docstring), then merge and report."""
    ray = _ray()
    fingerprint = _fingerprint(cfg)
    print(
        f"enrich: {plan.rows:,} rows in {len(plan.partitions)} partitions ({len(todo)} to run, up to {k} at once, "
        f"{share} runs in flight each)",
        file=sys.stderr,
    )
    results: dict[int, dict[str, Any]] = {}
    running: dict[Any, Partition] = {}
    queue = list(todo)
    started = time.monotonic()
    interrupted = False

    def need(p: Partition) -> int:
        return first_tier_need(cfg, plan.journal(p), p.rows)

    # first tier first across partitions: the governor keeps money for the first-tier rows of every
    # partition still to run before it pays an escalation step anywhere (finished ones need nothing)
    ray.get([governor.expect.remote(p.name, need(p) if p in todo else 0) for p in plan.partitions])
    try:
        while True:
            spent_before = sum(journal_spend(plan.journal(p)) for p in plan.partitions)
            parked: list[Partition] = []  # stopped by the budget (or made way for others) with work left
            while queue or running:
                while queue and len(running) < k:
                    p = queue.pop(0)
                    pcfg = partition_config(cfg, plan, p, share, dataset)
                    ref = task.remote(
                        pcfg,
                        p.name,
                        governor,
                        rows=p.rows,
                        api_key=api_key,
                        emulated=emulated,
                        retry_failed=retry_failed,
                        adopt=adopt,
                        cache_reads=not fresh,
                    )
                    running[ref] = p
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    p = running.pop(ref)
                    results[p.index] = _collect(ray, ref, p)
                    # again from here: a task that died for good never settled, and its need would hold others
                    ray.get(governor.settle.remote(p.name, journal_spend(plan.journal(p)), need(p)))
                    _record(cfg, plan, p, results[p.index], fingerprint, dataset)
                    if results[p.index].get("deferred") or results[p.index]["exit_code"] == EXIT_BUDGET:
                        parked.append(p)
            # another round while it can pay for something: a partition that made way runs its escalation
            # steps now, and money other partitions left unused goes to rows still waiting for it
            if sum(journal_spend(plan.journal(p)) for p in plan.partitions) <= spent_before:
                break
            free = ray.get(governor.free.remote())
            if free is None:  # no budget at all: another round could not change what stopped them
                break
            queue = sorted(
                (p for p in parked if _cheapest_pending(plan.journal(p)) <= free),
                key=lambda p: (need(p) == 0, p.index),  # rows never researched first
            )
            if not queue:
                break
            ray.get([governor.expect.remote(p.name, need(p)) for p in queue])
    except KeyboardInterrupt:
        interrupted = True
        for ref in running:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        # ray.cancel raises KeyboardInterrupt in each partition's run_job, which stops it (progress.Stop): no new
        # run is sent, those in flight are recorded, its output is written. Wait for that before Ray may shut down.
        with contextlib.suppress(Exception):
            ray.wait(list(running), num_returns=len(running), timeout=PARTITION_STOP_S)
    snapshot = {}
    with contextlib.suppress(Exception):
        snapshot = ray.get(governor.snapshot.remote(), timeout=10)
    return _finish(cfg, plan, results, dataset, interrupted, time.monotonic() - started, snapshot)


def _cheapest_pending(journal: Path) -> float:
    """Price of the cheapest pending run of a partition journal (inf: nothing pending)."""
    prices = [PROCESSORS[p].price_micros for p in journal_pending(journal) if p in PROCESSORS]
    return min(prices, default=math.inf)


def _collect(ray: Any, ref: Any, p: Partition) -> dict[str, Any]:
    """A partition task's summary; a task that failed for good becomes a resumable stop (or a bug report)."""
    try:
        return dict(ray.get(ref))
    except ray.exceptions.RayTaskError as exc:
        cause = str(exc.cause if getattr(exc, "cause", None) else exc).splitlines()[0]
        return {"exit_code": EXIT_FAILED_ROWS, "message": f"{p.name}: {cause}", "rows": 0, "output": None}
    except ray.exceptions.RayError as exc:
        return {
            "exit_code": EXIT_INTERRUPTED,
            "rows": 0,
            "output": None,
            "message": f"{p.name}: lost after {TASK_RETRIES} retries ({type(exc).__name__}); run again to resume",
        }


def _finished(plan: PartitionPlan, p: Partition, fingerprint: str, rerun: bool) -> bool:
    """Did this partition end with every row completed, on this very slice and task? (then it is skipped)"""
    if rerun:
        return False
    try:
        m = json.loads(plan.marker(p).read_text())
    except (OSError, ValueError):
        return False
    return (
        m.get("exit_code") == EXIT_OK
        and m.get("slice_digest") == p.digest
        and m.get("config") == fingerprint
        and bool(m.get("output"))
        and Path(m["output"]).exists()
    )


def _record(
    cfg: RunConfig, plan: PartitionPlan, p: Partition, res: dict[str, Any], fingerprint: str, dataset: bool
) -> None:
    """A partition ended: its marker, and (dataset output) its file then the manifest."""
    if res.get("output") is None:
        return
    atomic_json(
        plan.marker(p),
        {**res, "partition": p.index, "slice_digest": p.digest, "config": fingerprint, "finished_at": time.time()},
    )
    if dataset:
        copy_into_dataset(Path(res["output"]), cfg.output.path, f"{p.name}.parquet")
        write_manifest(
            cfg.output.path,
            _manifest_entries(plan),
            len(plan.partitions),
            {"emulated": any(e.get("emulated") for e in _markers(plan))},
        )


def _markers(plan: PartitionPlan) -> list[dict[str, Any]]:
    out = []
    for p in plan.partitions:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(plan.marker(p).read_text()))
    return out


def _manifest_entries(plan: PartitionPlan) -> list[dict[str, Any]]:
    return [
        {
            "partition": m["partition"],
            "file": f"part-{m['partition']:05d}.parquet",
            "rows": m.get("rows", 0),
            "exit_code": m["exit_code"],
            "status_counts": m.get("status_counts", {}),
            "spend_usd": m.get("spend_usd", 0.0),
        }
        for m in _markers(plan)
    ]


def _finish(
    cfg: RunConfig,
    plan: PartitionPlan,
    results: dict[int, dict[str, Any]],
    dataset: bool,
    interrupted: bool,
    elapsed: float,
    governor: dict[str, Any],
) -> JobResult:
    """Merge (single-file output), write the job report, and say how the job ended."""
    markers = {m["partition"]: m for m in _markers(plan)}
    codes = [
        results.get(p.index, markers.get(p.index, {"exit_code": EXIT_INTERRUPTED}))["exit_code"]
        for p in plan.partitions
    ]
    if interrupted:
        codes.append(EXIT_INTERRUPTED)
    status: dict[str, int] = {}
    for m in markers.values():
        for k, v in (m.get("status_counts") or {}).items():
            status[k] = status.get(k, 0) + v
    spend = sum(journal_spend(plan.journal(p)) for p in plan.partitions) / 1e6
    paid: dict[str, tuple[int, int]] = {}  # per processor over every partition, as one process's report has it
    for p in plan.partitions:
        for proc, (n, micros) in journal_paid_by_processor(plan.journal(p)).items():
            runs, total = paid.get(proc or UNATTRIBUTED, (0, 0))
            paid[proc or UNATTRIBUTED] = (runs + n, total + micros)
    missing = [p for p in plan.partitions if p.index not in markers]
    out = cfg.output.path
    report: dict[str, Any] = {
        "output": str(out),
        "rows": sum(m.get("rows", 0) for m in markers.values()),
        "status_counts": status,
        "spend_usd": round(spend, 6),
        "runs_paid": sum(n for n, _ in paid.values()),
        "cost_by_processor": {
            proc: {"runs": n, "cost_usd": round(micros / 1e6, 6)}
            for proc, (n, micros) in sorted(paid.items(), key=lambda kv: strength(kv[0]))
        },
        "partitions": len(plan.partitions),
        "elapsed_s": round(elapsed, 3),
        "emulated": any(m.get("emulated") for m in markers.values()),
        "journal_mode": one_mode([m.get("journal_mode") for m in [*markers.values(), *results.values()]]),
        "governor": governor,
        "per_partition": [
            {
                "partition": i,
                **{k: m.get(k) for k in ("exit_code", "rows", "status_counts", "spend_usd", "message", "journal_mode")},
            }
            for i, m in sorted(markers.items())
        ],
    }
    if dataset:
        written = f"dataset {out} ({len(markers)} of {len(plan.partitions)} partitions in {out / '_manifest.json'})"
        manifest = read_manifest(out)
        report["manifest"] = str(out / "_manifest.json") if manifest else None
    elif missing:
        written = f"nothing written to {out}: partition(s) {', '.join(p.name for p in missing[:5])} have no output yet"
    else:
        merge_files([Path(markers[p.index]["output"]) for p in plan.partitions], out)
        written = f"wrote {report['rows']} rows to {out}"
        atomic_json(report_json_path(out), report)
    summary = (
        f"{written} ({', '.join(f'{v} {k}' for k, v in sorted(status.items())) or 'no rows'}); spent "
        f"${spend:.4f} across {len(plan.partitions)} partitions{' [EMULATED]' if report['emulated'] else ''}"
    )
    code = worst(codes)
    lines = [summary]  # the summary under it (runs and cost per processor) is added from the report: run_lines
    bad = [r for r in results.values() if r["exit_code"] not in (EXIT_OK, EXIT_BUDGET)]
    for r in bad[:3]:
        lines.append(r["message"].splitlines()[-1])
    if any(r["exit_code"] == EXIT_BUDGET for r in results.values()):  # one line for the job, not one per partition
        pending: dict[str, int] = {}
        for p in plan.partitions:
            for proc, n in journal_pending(plan.journal(p)).items():
                pending[proc] = pending.get(proc, 0) + n
        budget = cfg.budget_micros
        daily = any("daily budget" in r["message"] for r in results.values() if r["exit_code"] == EXIT_BUDGET)
        why = (
            f"budget reached: {spend:.4f} USD of the job's {budget / 1e6:.4f} USD spent"
            if budget is not None and not daily
            else "daily budget reached (limits.daily_budget_usd)"
        )
        lines.append(f"{why}: {left_undone(cfg, pending, status)}")
    if code == EXIT_INTERRUPTED:
        lines.append("interrupted; progress is saved in the partition journals. Resume with the same command")
    return JobResult(code, "\n".join(lines), report, status, out, plan.parts_dir)
