"""Where a journal lives: a local disk or a network file system, and the journal mode that is correct there.

SQLite's WAL mode keeps its index in shared memory (the `-shm` file, mapped by every process that
uses the database), so "all processes using a database must be on the same host computer; WAL does
not work over a network filesystem". A partition journal of a Ray job is opened by one process at a
time, but after a node dies another node opens it. So a journal gets one of two modes:

- `local`: WAL, as always (fast; readers beside a live run never wait).
- `network`: SQLite's rollback journal (`journal_mode=DELETE`): no `-shm` and no `-wal`, the mode is
  recorded in the file's own header, so every opener (another node, `enrich status`, the governor,
  the sqlite3 shell) uses it correctly without being told, and read-only views still work beside a
  live run. The job's own lock (journal.py) is unchanged.

`limits.journal_mode` ("auto" | "local" | "network", flag `--journal-mode`) chooses; "auto" detects
the file system of the journal's folder from the mount table (`/proc/mounts`, longest mount point
that contains the path) and from `statfs(2)`'s f_type, and counts it as network when either says so.
Both sources are seams (`detect(path, mounts=..., f_type=...)`), which is how the tests give a path
the type of an NFS or SMB mount on machines that cannot mount one.

FUSE file systems (sshfs, s3fs, gcsfuse, glusterfs...) count as network: enrich cannot tell a local
FUSE one (ntfs-3g) apart, and the network mode is correct everywhere, only slower. Force `local` there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

JournalMode = Literal["local", "network"]
ModeSetting = Literal["auto", "local", "network"]
MOUNTS = Path("/proc/mounts")  # this process's mount namespace, as the kernel sees it

# mount table types (the third field of /proc/mounts); "fuse." and "fuse" prefixes are matched too
NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "smb2",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "afs",
        "coda",
        "ncpfs",
        "ocfs2",
        "gfs2",
        "beegfs",
        "orangefs",
        "pvfs2",
        "davfs",
        "fuse",
        "fuseblk",
    }
)
# statfs(2) f_type magic numbers (linux/magic.h and the file systems' own headers)
NETWORK_MAGIC = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x73757245: "coda",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x7461636F: "ocfs2",
    0x01161970: "gfs2",
    0x19830326: "beegfs",
}
# NFS mount options under which locks stay on this host, so another host never sees the job's lock
_LOCAL_LOCKS = ("nolock", "local_lock=all", "local_lock=flock")


@dataclass(frozen=True)
class FileSystem:
    """What `detect` found: the type's name ("ext4", "nfs4", "0x65735546"...), whether it is a network
    one, and for NFS whether it keeps locks on this host only (`nolock`, `local_lock=flock|all`)."""

    type: str
    network: bool
    local_locks: bool = False


@dataclass(frozen=True)
class Storage:
    """A job's journal mode, resolved once: `mode`, the file system it was chosen for, and why."""

    mode: JournalMode
    fs: str
    why: str  # "detected" | "forced" (by limits.journal_mode or --journal-mode)

    def as_dict(self) -> dict[str, str]:
        return {"journal_mode": self.mode, "file_system": self.fs, "why": self.why}


def _unescape(field: str) -> str:
    """A /proc/mounts field: space, tab, newline and backslash are written as octal escapes (\\040...)."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_of(path: str, mounts: str) -> tuple[str, str, str] | None:
    """(mount point, type, options) of the mount holding `path` (absolute, symlinks resolved) in a mount
    table's text: the longest mount point that is the path or one of its parents, the last one listed
    when several are stacked there (the one on top).

    >>> mount_of("/srv/data/j.sqlite", "/dev/vda / ext4 rw 0 0\\nh:/x /srv/data nfs4 rw,local_lock=none 0 0")
    ('/srv/data', 'nfs4', 'rw,local_lock=none')
    """
    best: tuple[str, str, str] | None = None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point, fstype, options = _unescape(parts[1]), parts[2], parts[3]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, options)
    return best


def is_network_type(fstype: str) -> bool:
    """Is a mount table type a network (or FUSE) file system? `fuse.sshfs` and `nfs4` are."""
    return fstype in NETWORK_TYPES or fstype.startswith("fuse.")


def statfs_type(path: str) -> int | None:
    """statfs(2)'s f_type for `path` (Linux), None where it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None

    class _Statfs(ctypes.Structure):  # f_type comes first (a long); the rest is room for the whole struct
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        buf = _Statfs()
        if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return buf.f_type & 0xFFFFFFFF  # a 32-bit magic, whatever the width of long


def _existing(real: Path) -> str:
    """The nearest existing folder of a path (statfs needs one; a journal may not exist yet)."""
    while not real.exists() and real != real.parent:
        real = real.parent
    return str(real)


def detect(path: str | Path, mounts: str | None = None, f_type: int | None = None) -> FileSystem:
    """The file system holding `path`. `mounts` (a mount table's text) and `f_type` (a statfs magic) are
    read from the system when not given; network when either the mount's type or the magic says so."""
    real = os.path.realpath(path)  # symlinks resolved as far as the path exists
    if mounts is None:
        try:
            mounts = MOUNTS.read_text(encoding="utf-8", errors="replace")
        except OSError:
            mounts = ""
    if f_type is None:
        f_type = statfs_type(_existing(Path(real)))
    found = mount_of(real, mounts)
    magic = NETWORK_MAGIC.get(f_type) if f_type is not None else None
    if found is not None:
        _point, fstype, options = found
        network = is_network_type(fstype) or magic is not None
        name = fstype if is_network_type(fstype) or magic is None else magic
        local_locks = fstype.startswith("nfs") and any(o in _LOCAL_LOCKS for o in options.split(","))
        return FileSystem(name, network, local_locks)
    if magic is not None:
        return FileSystem(magic, True)
    return FileSystem("unknown" if f_type is None else hex(f_type), False)


def resolve(setting: ModeSetting, path: str | Path, fs: FileSystem | None = None) -> Storage:
    """The journal mode for a journal at `path` under `limits.journal_mode` = `setting`."""
    fs = fs or detect(path)
    if setting == "auto":
        return Storage("network" if fs.network else "local", fs.type, "detected")
    return Storage(setting, fs.type, "forced")


def mode_of(sqlite_mode: str) -> str:
    """The enrich mode of a journal from SQLite's journal mode: "wal" is local, "delete" network."""
    return {"wal": "local", "delete": "network"}.get(sqlite_mode.lower(), sqlite_mode.lower())


def one_mode(modes: list[str | None]) -> str | None:
    """The mode of several journals (a --ray job's partitions): theirs, "mixed", or None when none is known."""
    known = {m for m in modes if m}
    return None if not known else known.pop() if len(known) == 1 else "mixed"
