"""The slot directories in shared memory: created private to this user, checked before use, and
removed when their owner is gone.

A directory here is only ever used or removed when it is a real directory (not a symlink) owned by
this user and writable by nobody else: another local user must never steer a trainer's writes.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = [
    "UnsafeMetricsDirectoryError",
    "check_private_directory",
    "create_agent_directory",
    "local_metrics_dir",
    "make_private_directory",
    "process_alive",
    "remove_other_runs",
    "remove_stale_agent_directories",
    "shared_memory_root",
]

_AGENT_PREFIX = "trainkit-metrics-agent-"
# trainkit-metrics-agent-u<uid>-pid<pid>-t<start ticks>-<random>: the owner is in the name, so a
# directory is attributable from the moment it exists.
_AGENT_NAME = re.compile(r"^trainkit-metrics-agent-u(\d+)-pid(\d+)-t(\d+)-")


class UnsafeMetricsDirectoryError(PermissionError):
    """A metrics directory exists but someone else could control it; nothing was written into it."""


def shared_memory_root() -> Path:
    """``/dev/shm`` where it exists and is writable (slots then never touch a disk), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def check_private_directory(path: Path) -> None:
    """Raise ``UnsafeMetricsDirectoryError`` unless ``path`` is a real directory of this user that
    no group or other user may write to."""
    info = os.lstat(path)
    uid = os.geteuid()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        problem = "is a symbolic link" if stat.S_ISLNK(info.st_mode) else "is not a directory"
    elif info.st_uid != uid:
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {uid})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    else:
        return
    raise UnsafeMetricsDirectoryError(
        f"metrics directory {path} {problem}; another user may have made it to redirect this "
        "trainer's writes, so it is not used. Remove it (as its owner or root) or choose another "
        "TRAINKIT_METRICS_PORT"
    )


def make_private_directory(path: Path) -> Path:
    """Create ``path`` with mode 0700, or accept an existing one that passes
    ``check_private_directory``; returns ``path``."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    check_private_directory(path)
    return path


def local_metrics_dir(port: int, run_id: str) -> Path:
    """Where workers without trainkit-run keep their slots: one directory per (user, port, run)."""
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return shared_memory_root() / f"trainkit-metrics-{getpass.getuser()}-p{port}-{safe_run}"


def _own_directory(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()


def remove_other_runs(current: Path) -> list[Path]:
    """Remove this user's directories of older runs on the same port; returns what was removed.

    Only one run can hold the port at a time, so older runs' directories for it are stale.
    """
    prefix = current.name.rsplit("-", 1)[0] + "-"
    removed = []
    for other in current.parent.glob(f"{prefix}*"):
        if other != current and _own_directory(other):
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    return removed


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone) and, given ``start_ticks``, is the same
    process that started then: a pid reused by a restarted container is not the old owner."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc to ask: trust kill()
    if fields[0] == b"Z":
        return False
    if start_ticks and len(fields) > 19 and fields[19].isdigit():
        return int(fields[19]) == start_ticks
    return True


def create_agent_directory(root: Path | None = None) -> Path:
    """A fresh private (0700) directory for the agent's slots, named after its owner process.

    Directories that earlier agents of this user left behind (killed before they could clean up)
    are removed first.
    """
    root = root or shared_memory_root()
    remove_stale_agent_directories(root)
    pid = os.getpid()
    prefix = f"{_AGENT_PREFIX}u{os.geteuid()}-pid{pid}-t{_start_ticks(pid) or 0}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def remove_stale_agent_directories(root: Path) -> list[Path]:
    """Remove this user's agent directories under ``root`` whose owning process is gone."""
    removed = []
    uid = os.geteuid()
    for path in root.glob(f"{_AGENT_PREFIX}*"):
        match = _AGENT_NAME.match(path.name)
        if match is None or int(match.group(1)) != uid or not _own_directory(path):
            continue
        if process_alive(int(match.group(2)), int(match.group(3))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
