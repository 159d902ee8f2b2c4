"""Where replicas live on disk and what makes one complete: names, the replica record, the commit.

A snapshot directory is received into a private temporary directory and renamed into place only
after every file's size and checksum verified, so a reader sees a whole snapshot or none. This
module checks every name that came from the network before it touches a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass

__all__ = [
    "RECORD_NAME",
    "FileEntry",
    "ReplicaRecord",
    "check_owner",
    "check_relative_path",
    "check_step",
    "commit_directory",
    "complete_steps",
    "fsync_tree",
    "list_snapshot_files",
    "read_record",
    "step_dir_name",
    "write_record",
]

#: The replica server's record inside each stored step; a snapshot may not contain this name.
RECORD_NAME = ".trainkit-replica.json"
RECORD_VERSION = 1
MAX_STEP = 10**12 - 1
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STEP_DIR = re.compile(r"^\d{12}$")
_MAX_PATH_CHARS = 1024
_MAX_FILES = 100_000


def check_owner(owner: object) -> str:
    """``owner`` when it is a safe directory name (letters, digits, ``._-``); else ValueError."""
    if not isinstance(owner, str) or not _OWNER.match(owner) or ".." in owner:
        raise ValueError(
            f"replica owner {owner!r}: expected 1-128 letters, digits, '.', '_' or '-' starting "
            "with a letter or digit and without '..', e.g. 'rank-3' or 'node-1'"
        )
    return owner


def check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"replica step {step!r}: expected an integer in 0..{MAX_STEP}")
    return step


def check_relative_path(path: object) -> str:
    """``path`` when it is a relative POSIX path that stays inside its directory; else ValueError."""
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH_CHARS:
        raise ValueError(f"snapshot file name {path!r}: expected 1-{_MAX_PATH_CHARS} characters")
    parts = path.split("/")
    if (
        path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ValueError(
            f"snapshot file name {path!r}: expected a relative path with '/' between plain names "
            "(no '..', '.', empty parts, backslashes or NUL)"
        )
    if parts[0] == RECORD_NAME:
        raise ValueError(f"snapshot file name {path!r} is reserved for the replica record")
    return path


def step_dir_name(step: int) -> str:
    return f"{step:012d}"


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot: its path inside the snapshot directory and size in bytes."""

    path: str
    size: int


def check_file_list(raw: object) -> list[FileEntry]:
    """The announced files of a snapshot, every name and size checked; ValueError otherwise."""
    if not isinstance(raw, list) or len(raw) > _MAX_FILES:
        raise ValueError(f"snapshot file list: expected a list of at most {_MAX_FILES} entries")
    entries: list[FileEntry] = []
    for item in raw:
        if not isinstance(item, dict):
            raise ValueError(f"snapshot file entry {item!r}: expected an object with path and size")
        size = item.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(
                f"snapshot file {item.get('path')!r}: size {size!r} is not a byte count"
            )
        entries.append(FileEntry(check_relative_path(item.get("path")), size))
    names = [entry.path for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("snapshot file list names a file twice")
    # "a" and "a/b" cannot both be files.
    directories = {
        "/".join(name.split("/")[:i]) for name in names for i in range(1, name.count("/") + 1)
    }
    clash = directories.intersection(names)
    if clash:
        raise ValueError(f"snapshot file {sorted(clash)[0]!r} is also a directory of another file")
    return entries


def list_snapshot_files(directory: str) -> list[FileEntry]:
    """Every regular file under ``directory`` (sorted); ValueError for links or special files."""
    entries: list[FileEntry] = []
    for parent, subdirectories, names in os.walk(directory, followlinks=False):
        subdirectories.sort()
        for name in [*names, *subdirectories]:
            full = os.path.join(parent, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ValueError(
                    f"snapshot {directory}: {full} is not a regular file (links and special files "
                    "are not replicated); write snapshots as plain files"
                )
            relative = os.path.relpath(full, directory).replace(os.sep, "/")
            entries.append(FileEntry(check_relative_path(relative), os.lstat(full).st_size))
    return sorted(entries, key=lambda entry: entry.path)


@dataclass(frozen=True)
class ReplicaRecord:
    """What the replica server stored for one step: every file with its size and checksum."""

    owner: str
    step: int
    checksum: str
    files: tuple[FileEntry, ...]
    checksums: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def files_json(self) -> list[dict[str, object]]:
        return [
            {"path": entry.path, "size": entry.size, "checksum": checksum}
            for entry, checksum in zip(self.files, self.checksums, strict=True)
        ]


def write_record(directory: str, record: ReplicaRecord) -> None:
    body = {
        "version": RECORD_VERSION,
        "owner": record.owner,
        "step": record.step,
        "checksum": record.checksum,
        "files": record.files_json(),
    }
    with open(os.path.join(directory, RECORD_NAME), "w") as file:
        json.dump(body, file)


def read_record(directory: str) -> ReplicaRecord:
    """The record of a stored step; ValueError when it is missing, unreadable or inconsistent."""
    path = os.path.join(directory, RECORD_NAME)
    try:
        with open(path) as file:
            body = json.load(file)
        entries = check_file_list([{"path": f["path"], "size": f["size"]} for f in body["files"]])
        return ReplicaRecord(
            owner=check_owner(body["owner"]),
            step=check_step(body["step"]),
            checksum=str(body["checksum"]),
            files=tuple(entries),
            checksums=tuple(str(f["checksum"]) for f in body["files"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"replica record {path}: {error}") from None


def complete_steps(owner_directory: str) -> list[int]:
    """The steps stored complete under ``owner_directory`` (renamed into place with a record)."""
    try:
        names = os.listdir(owner_directory)
    except FileNotFoundError:
        return []
    return sorted(
        int(name)
        for name in names
        if _STEP_DIR.match(name)
        and os.path.exists(os.path.join(owner_directory, name, RECORD_NAME))
    )


def fsync_tree(directory: str) -> None:
    """fsync every file and directory under ``directory`` (cheap on tmpfs, needed on disks)."""
    for parent, _, names in os.walk(directory):
        for name in names:
            descriptor = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_directory(parent)


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit_directory(staged: str, final: str) -> None:
    """Make the verified ``staged`` directory visible as ``final`` in one rename.

    An existing ``final`` (the same step pushed again) is moved aside first and removed after, so a
    reader sees the old copy, then nothing, then the new copy, never a mix.
    """
    fsync_tree(staged)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    aside = None
    if os.path.lexists(final):
        aside = f"{staged}.replaced"
        os.rename(final, aside)
    os.rename(staged, final)
    _fsync_directory(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_tree(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
