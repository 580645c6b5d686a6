"""Journals and spend ledgers on network file systems (storage.py): detection, the network mode, refusals.

These machines cannot mount NFS or SMB, so detection is tested by giving a path the type of such a mount
(an injected mount table or statfs magic), and the network mode by forcing it (`journal_mode = "network"`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from enrich import storage
from enrich.cli import main
from enrich.config import load_config
from enrich.errors import ConfigError
from enrich.job import EXIT_OK, EXIT_USAGE, run_job
from enrich.journal import Journal
from enrich.scale.governor import GovernorState
from enrich.scale.runner import check_shared
from enrich.spend import utc_day
from enrich.storage import FileSystem, detect, mount_of, resolve
from tests.conftest import ROOT, run_enrich, write_config

COMPANIES = ROOT / "data" / "companies.csv"
EXT4 = 0xEF53
MOUNTS = """sysfs /sys sysfs rw,nosuid 0 0
/dev/vda / ext4 rw,relatime 0 0
srv:/export /mnt/shared nfs4 rw,vers=4.2,local_lock=none,addr=10.0.0.2 0 0
//nas/team /mnt/team cifs rw,vers=3.1.1 0 0
user@h:/data /mnt/ssh fuse.sshfs rw,user_id=0 0 0
srv:/old /mnt/old nfs rw,vers=3,nolock,local_lock=all 0 0
/dev/vdb /mnt/shared/scratch xfs rw 0 0
srv:/sp /mnt/with\\040space nfs4 rw,local_lock=none 0 0
"""


def ledger(base_url: str) -> list[dict[str, Any]]:
    return httpx.get(base_url + "/_emulator/ledger", timeout=30).json()


def job(tmp_path: Path, limits: str = "", out: str = "o.csv", name: str = "job.toml") -> Path:
    return write_config(
        tmp_path / name,
        input_path=COMPANIES,
        output=tmp_path / out,
        key=["company"],
        columns=["company"],
        limits=limits,
    )


def sidecars(folder: Path) -> list[str]:
    """SQLite's WAL files beside the journals in a folder (the network mode never has any)."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(("-wal", "-shm")))


def mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lines: str) -> None:
    """This process's mount table, as enrich reads it, is the real one plus `lines` (mounts under tmp_path)."""
    table = tmp_path / "mounts"
    table.write_text(storage.MOUNTS.read_text() + lines)
    monkeypatch.setattr(storage, "MOUNTS", table)


# ---- detection, with injected types ----------------------------------------------------------------


def test_the_longest_mount_point_holding_a_path_gives_its_type() -> None:
    """The mount holding a path is the longest mount point containing it; octal escapes are read."""
    assert mount_of("/mnt/shared/jobs/a.sqlite", MOUNTS) == (
        "/mnt/shared",
        "nfs4",
        "rw,vers=4.2,local_lock=none,addr=10.0.0.2",
    )
    assert mount_of("/mnt/shared/scratch/a.sqlite", MOUNTS)[1] == "xfs"  # a local disk mounted inside the share
    assert mount_of("/mnt/sharedother/a", MOUNTS)[1] == "ext4"  # a prefix of the name is not a parent folder
    assert mount_of("/mnt/with space/j.sqlite", MOUNTS)[1] == "nfs4"
    assert mount_of("/home/u/j.sqlite", MOUNTS)[0] == "/"


@pytest.mark.parametrize(
    "path,fstype,network",
    [
        ("/mnt/shared/j.sqlite", "nfs4", True),
        ("/mnt/team/j.sqlite", "cifs", True),
        ("/mnt/ssh/j.sqlite", "fuse.sshfs", True),
        ("/mnt/old/j.sqlite", "nfs", True),
        ("/mnt/shared/scratch/j.sqlite", "xfs", False),
        ("/srv/j.sqlite", "ext4", False),
    ],
)
def test_network_file_systems_are_detected_from_the_mount_table(path: str, fstype: str, network: bool) -> None:
    """NFS, SMB/CIFS and FUSE mounts are network file systems; ext4 and xfs are local disks."""
    fs = detect(path, mounts=MOUNTS, f_type=EXT4)
    assert (fs.type, fs.network) == (fstype, network)


@pytest.mark.parametrize(
    "magic,name",
    [(0x6969, "nfs"), (0xFF534D42, "cifs"), (0xFE534D42, "smb2"), (0x65735546, "fuse"), (0x01021997, "9p")],
)
def test_statfs_magic_alone_detects_a_network_file_system(magic: int, name: str) -> None:
    """With no mount table, statfs's f_type says NFS, SMB, FUSE or 9p; an ext4 magic is local."""
    assert detect("/x/j.sqlite", mounts="", f_type=magic) == FileSystem(name, True)
    assert not detect("/x/j.sqlite", mounts="", f_type=EXT4).network


def test_either_source_saying_network_is_enough() -> None:
    """A mount table that shows ext4 where statfs says NFS (a stale table) still gives the network mode."""
    fs = detect("/srv/j.sqlite", mounts=MOUNTS, f_type=0x6969)
    assert fs.network and fs.type == "nfs"


def test_nfs_mounts_that_keep_locks_on_each_host_are_recognised() -> None:
    """`nolock` / `local_lock=all|flock` NFS mounts are marked: other hosts would not see the job's lock."""
    assert detect("/mnt/old/j.sqlite", mounts=MOUNTS, f_type=EXT4).local_locks
    assert not detect("/mnt/shared/j.sqlite", mounts=MOUNTS, f_type=EXT4).local_locks


def test_this_machines_own_disk_is_local_and_statfs_answers() -> None:
    """On this machine's disk, both real sources are read: a local file system and a statfs magic."""
    assert storage.statfs_type(str(ROOT)) is not None
    fs = detect(ROOT / "enrich")
    assert not fs.network and fs.type not in ("", "unknown")


def test_auto_follows_detection_and_a_forced_mode_wins() -> None:
    """`auto` picks network on NFS and local on ext4; `local` / `network` are taken as given."""
    nfs, ext4 = FileSystem("nfs4", True), FileSystem("ext4", False)
    assert resolve("auto", "/x", nfs).as_dict() == {"journal_mode": "network", "file_system": "nfs4", "why": "detected"}
    assert resolve("auto", "/x", ext4).mode == "local"
    assert resolve("network", "/x", ext4).as_dict() == {
        "journal_mode": "network",
        "file_system": "ext4",
        "why": "forced",
    }
    assert resolve("local", "/x", nfs).mode == "local"


# ---- the network mode, forced ----------------------------------------------------------------------


def test_a_network_journal_round_trips_with_no_wal_files_and_converts_both_ways(tmp_path: Path) -> None:
    """network mode: a rollback journal (no -wal, no -shm) that keeps its rows; local again gives WAL."""
    path = tmp_path / "j.sqlite"
    j = Journal.open(path, mode="network")
    j.set("k", {"v": 1})
    assert j.sqlite_mode() == "delete" and sidecars(tmp_path) == []
    j.close()
    j = Journal.open(path)  # no mode (export, review): as the journal is
    assert j.sqlite_mode() == "delete" and j.get("k") == {"v": 1}
    j.close()
    j = Journal.open(path, mode="local")
    assert j.sqlite_mode() == "wal" and j.get("k") == {"v": 1}
    j.close()
    j = Journal.open(path, mode="network")
    assert j.sqlite_mode() == "delete" and j.get("k") == {"v": 1}
    j.close()
    assert sidecars(tmp_path) == []


def test_a_wal_journal_a_killed_local_run_left_is_switched_without_a_shm(tmp_path: Path) -> None:
    """A WAL journal with committed transactions still in its -wal is opened in the network mode without ever
    creating the shared-memory file (as on NFS, where none may be used); nothing committed is lost."""
    path = tmp_path / "j.sqlite"
    code = (
        "import os, sys; from enrich.journal import Journal; j = Journal.open(sys.argv[1], mode='local'); "
        "j.conn.execute('PRAGMA wal_autocheckpoint=0'); [j.set(f'k{i}', i) for i in range(50)]; os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=False)
    assert Path(f"{path}-wal").stat().st_size > 0
    Path(f"{path}-shm").unlink()
    j = Journal.open(path, mode="network")
    assert [j.get(f"k{i}") for i in range(50)] == list(range(50)) and j.sqlite_mode() == "delete"
    j.close()
    assert sidecars(tmp_path) == []


def test_a_read_only_view_of_a_network_journal_whose_writer_died_mid_transaction(tmp_path: Path) -> None:
    """status/the governor read a network journal a writer left mid-transaction (a hot rollback journal):
    the committed state, not an error; the unfinished transaction is rolled back as the next writer would."""
    path = tmp_path / "j.sqlite"
    code = (
        "import os, sys; from enrich.journal import Journal; j = Journal.open(sys.argv[1], mode='network'); "
        "j.set('spent', 7); j.conn.execute('PRAGMA cache_size=1'); j.conn.execute('BEGIN IMMEDIATE'); "
        "[j.set(f'x{i}', 'y' * 500, j.conn) for i in range(3000)]; os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=False)
    assert Path(f"{path}-journal").is_file()  # the killed writer's rollback journal is hot
    view = Journal.open(path, readonly=True)
    try:
        assert view.get("spent") == 7 and view.get("x1") is None and view.integrity_ok()
    finally:
        view.close()
    assert not Path(f"{path}-journal").exists()


def test_run_in_the_forced_network_mode_then_status_report_export_and_resume(tmp_path: Path, emulator) -> None:
    """`--journal-mode network`: the run's journal is a rollback journal, status and the report say so, export
    and a second run (which reuses every result) keep it, and no WAL file ever appears."""
    emu = emulator(time_scale=0.0)
    cfg = job(tmp_path)
    r = run_enrich("run", str(cfg), "--base-url", emu.base_url, "--journal-mode", "network")
    assert r.returncode == EXIT_OK, r.stderr
    journal = tmp_path / "o.csv.journal.sqlite"
    st = json.loads(run_enrich("status", str(journal), "--json").stdout)
    assert st["journal_mode"] == "network" and st["journal_storage"]["why"] == "forced"
    text = run_enrich("status", str(cfg)).stdout
    assert "journal mode network (rollback journal, no WAL;" in text and "forced)" in text
    report = json.loads((tmp_path / "o.csv.report.json").read_text())
    assert report["journal_mode"] == "network" and report["journal_storage"]["why"] == "forced"
    assert run_enrich("export", str(journal), "--output", str(tmp_path / "x.csv")).returncode == EXIT_OK
    runs = len(ledger(emu.base_url))
    cfg.write_text(cfg.read_text().replace("[limits]", '[limits]\njournal_mode = "network"'))
    again = run_enrich("run", str(cfg), "--base-url", emu.base_url)
    assert again.returncode == EXIT_OK and len(ledger(emu.base_url)) == runs  # resumed: nothing paid twice
    view = Journal.open(journal, readonly=True)
    assert view.sqlite_mode() == "delete"
    view.close()
    assert sidecars(tmp_path) == []


def test_a_journal_on_a_detected_nfs_mount_is_opened_in_the_network_mode(
    tmp_path: Path, emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto`: a journal whose folder the mount table shows as NFS gets the network mode, recorded as detected."""
    emu = emulator(time_scale=0.0)
    (tmp_path / "share").mkdir()
    mounted(monkeypatch, tmp_path, f"srv:/x {tmp_path}/share nfs4 rw,local_lock=none 0 0\n")
    res = run_job(
        load_config(job(tmp_path, out="share/o.csv"), {"api.base_url": emu.base_url}),
        api_key="k",
        install_signals=False,
    )
    assert res.exit_code == EXIT_OK, res.message
    assert res.report["journal_storage"] == {"journal_mode": "network", "file_system": "nfs4", "why": "detected"}
    assert sidecars(tmp_path / "share") == []
    local = run_job(
        load_config(job(tmp_path, out="o.csv", name="l.toml"), {"api.base_url": emu.base_url}),
        api_key="k",
        install_signals=False,
    )
    assert local.report["journal_mode"] == "local"  # beside it, on the machine's own disk: WAL as ever


# ---- spend ledgers ---------------------------------------------------------------------------------


def test_a_spend_ledger_on_a_network_file_system_is_refused_before_anything_is_paid(
    tmp_path: Path, emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daily budget's ledger on NFS: exit 2, one line saying why and what to do, no run created, no journal."""
    emu = emulator(time_scale=0.0)
    (tmp_path / "share").mkdir()
    mounted(monkeypatch, tmp_path, f"srv:/x {tmp_path}/share nfs4 rw,local_lock=none 0 0\n")
    cfg = job(tmp_path, limits=f'daily_budget_usd = 1\nspend_ledger = "{tmp_path}/share/spend.sqlite"')
    monkeypatch.setenv("PARALLEL_API_KEY", "k")
    code = main(["run", str(cfg), "--base-url", emu.base_url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(err) == 1, err
    assert "network file system (nfs4)" in err[0] and "put the ledger on a local disk" in err[0]
    assert ledger(emu.base_url) == [] and not (tmp_path / "o.csv.journal.sqlite").exists()
    assert not (tmp_path / "share" / "spend.sqlite").exists()


def test_a_day_lease_takes_what_other_jobs_left_and_settles_to_what_was_reserved(tmp_path: Path) -> None:
    """The day lease of a --ray job: the daily budget minus the other jobs' entries and its own reservations,
    at most its budget left; settling gives back what it did not use."""
    path, day = tmp_path / "spend.sqlite", utc_day(time.time())
    other = Journal.open(":memory:")
    other.attach_ledger(path, "other-job")
    with other.tx() as c:
        c.execute("INSERT INTO spendledger.ledger(day, job, row_key, micros) VALUES (?, 'other-job', 'r', 300)", (day,))
    me = Journal.open(":memory:")
    me.attach_ledger(path, "ray-job")
    assert me.day_lease(day, mine=100, daily=1_000, cap=None) == 600  # 1000 - 300 (others) - 100 (mine)
    assert other.spent_on_day(day) == 1_000  # the lease is reserved at once: the other job sees the day spent
    assert me.day_lease(day, mine=100, daily=1_000, cap=250) == 250  # the job's own budget left caps it
    me.day_settle(day, 180)  # the job reserved 180 in all that day
    assert other.spent_on_day(day) == 480
    other.close()
    me.close()


def test_the_governor_caps_a_job_at_its_day_lease_and_says_daily_budget() -> None:
    """With a day lease the governor grants up to the ceiling across partitions and names the daily budget."""
    g = GovernorState(Path("/nonexistent-parts"), 60, budget_micros=None, persist=False, daily=(1_000, 400))
    assert g.lease("part-00000", 300, 0) == (300, "granted")
    assert g.lease("part-00001", 300, 0, least=150) == (0, "spent")
    assert g.lease("part-00001", 300, 0, least=100) == (100, "granted")
    assert g.explain("spent").startswith("daily budget reached") and g.free() == 0


def test_a_multi_node_journal_on_an_nfs_mount_with_host_local_locks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a multi-node cluster, an NFS mount with local_lock=flock would hide one node's journal lock from
    another: refused (exit 2) with the mount option to fix."""
    share = Path("/srv/enrich-nfs-test")  # need not exist: it is checked against the mount table
    mounted(monkeypatch, tmp_path, f"srv:/x {share} nfs4 rw,local_lock=flock 0 0\n")
    cfg = load_config(job(tmp_path, out=str(share / "o.csv")))
    with pytest.raises(ConfigError, match="local_lock=none"):
        check_shared(cfg, share / "o.csv.journal.sqlite")
    mounted(monkeypatch, tmp_path, f"srv:/x {share} nfs4 rw,local_lock=none 0 0\n")
    check_shared(cfg, share / "o.csv.journal.sqlite")


def test_the_journal_mode_setting_is_validated(tmp_path: Path) -> None:
    """`journal_mode` takes auto, local or network; anything else is a one-line config error."""
    with pytest.raises(ConfigError, match="journal_mode"):
        load_config(job(tmp_path, limits='journal_mode = "wal"'))
    assert load_config(job(tmp_path)).limits.journal_mode == "auto"
