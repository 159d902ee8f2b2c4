"""The commit record: the one object whose presence makes a step visible, and how it is checked.

``step_<n>/COMMIT.json`` lists every file of the step with its size and block checksums, the world
size and versions, and a checksum of itself. It is written last, in one piece; nothing else marks a
step committed.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field

from trainkit.checkpoint.blocks import BufferPool, FileInfo, verify_file
from trainkit.checkpoint.errors import CorruptCheckpointError, UnsupportedCheckpointError
from trainkit.checkpoint.metadata import is_plain_file_name
from trainkit.checkpoint.root import CheckpointRoot

__all__ = [
    "COMMIT_NAME",
    "FORMAT_VERSION",
    "PICKLED_METADATA_FORMAT_VERSION",
    "CommitRecord",
    "check_sizes",
    "classify_steps",
    "parse_step_dir",
    "read_commit",
    "scan_steps",
    "step_dir_name",
    "verify_step",
    "write_commit",
]

COMMIT_NAME = "COMMIT.json"
#: 2: DCP metadata is JSON. 1: it was a pickle, which restore refuses (unpickling can run code).
FORMAT_VERSION = 2
PICKLED_METADATA_FORMAT_VERSION = 1
_READABLE_FORMAT_VERSIONS = {PICKLED_METADATA_FORMAT_VERSION, FORMAT_VERSION}
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:010d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


@dataclass
class CommitRecord:
    """What a committed step holds; ``files`` maps names inside the step directory to their info."""

    step: int
    world_size: int
    files: dict[str, FileInfo]
    created_unix_s: float
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(info.size for info in self.files.values())

    def encode(self) -> bytes:
        body = {
            "format_version": self.format_version,
            "step": self.step,
            "world_size": self.world_size,
            "created_unix_s": self.created_unix_s,
            "versions": self.versions,
            "files": {name: self.files[name].as_dict() for name in sorted(self.files)},
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return json.dumps(
            {"record": body, "record_crc32": zlib.crc32(canonical.encode())}, indent=1
        ).encode()

    @classmethod
    def decode(cls, data: bytes, *, where: str, step: int | None = None) -> CommitRecord:
        """Parse and self-check a record; any defect raises ``CorruptCheckpointError`` naming ``where``."""
        try:
            outer = json.loads(data)
            body = outer["record"]
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
            if zlib.crc32(canonical.encode()) != outer["record_crc32"]:
                raise ValueError(f"record checksum mismatch (stored {outer['record_crc32']})")
            if body["format_version"] not in _READABLE_FORMAT_VERSIONS:
                raise UnsupportedCheckpointError(
                    step,
                    f"{where}: format_version {body['format_version']} is not {FORMAT_VERSION} "
                    f"(written by trainkit {body.get('versions', {}).get('trainkit', '?')}); "
                    "upgrade trainkit to read it",
                )
            record = cls(
                step=int(body["step"]),
                world_size=int(body["world_size"]),
                files={name: FileInfo.from_dict(info) for name, info in body["files"].items()},
                created_unix_s=float(body["created_unix_s"]),
                versions=dict(body.get("versions", {})),
                format_version=int(body["format_version"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptCheckpointError(
                step, f"{where}: unreadable commit record ({error}); the step is ignored"
            ) from None
        escaping = sorted(name for name in record.files if not is_plain_file_name(name))
        if escaping:
            raise CorruptCheckpointError(
                step,
                f"{where}: the record lists {escaping[0]!r}, a path outside the step directory; "
                "refused (the record was not written by trainkit)",
            )
        if step is not None and record.step != step:
            raise CorruptCheckpointError(
                step,
                f"{where}: the record says step {record.step} but lies in the directory of step {step}",
            )
        return record


def write_commit(store: CheckpointRoot, step_dir: str, record: CommitRecord) -> None:
    """Publish ``record``: from here on the step is visible to ``restore``."""
    store.write_atomic(f"{step_dir}/{COMMIT_NAME}", record.encode())


def read_commit(store: CheckpointRoot, step_dir: str, step: int) -> CommitRecord:
    path = f"{step_dir}/{COMMIT_NAME}"
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(step, f"{store.display(path)}: no commit record") from None
    return CommitRecord.decode(data, where=store.display(path), step=step)


def check_sizes(store: CheckpointRoot, step_dir: str, record: CommitRecord, step: int) -> None:
    """Every file the record lists exists with its recorded size (cheap: no data is read)."""
    for name, info in record.files.items():
        path = f"{step_dir}/{name}"
        try:
            actual = store.size(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                step, f"{store.display(path)}: listed in the commit record but missing"
            ) from None
        if actual != info.size:
            raise CorruptCheckpointError(
                step,
                f"{store.display(path)}: {actual} bytes, the commit record says {info.size}",
            )


def verify_step(store: CheckpointRoot, step: int, pool: BufferPool) -> CommitRecord:
    """Read the record and every byte it lists, checking sizes and block checksums."""
    step_dir = store.join(step_dir_name(step))
    record = read_commit(store, step_dir, step)
    check_sizes(store, step_dir, record, step)
    for name, info in sorted(record.files.items()):
        verify_file(store, f"{step_dir}/{name}", info, pool, step=step)
    return record


def classify_steps(store: CheckpointRoot) -> tuple[list[int], list[int], list[int]]:
    """(committed, partial, not understood) steps, each ascending.

    Committed: the record parses, self-checks and every file it lists has its size. Partial: no
    record. Not understood: a record that is damaged or of another format version; nothing may
    count or delete those (a newer trainkit may have written them before a rollback).
    """
    committed, partial = scan_steps(store)
    understood, unknown = [], []
    for step in committed:
        step_dir = store.join(step_dir_name(step))
        try:
            check_sizes(store, step_dir, read_commit(store, step_dir, step), step)
        except (CorruptCheckpointError, UnsupportedCheckpointError):
            unknown.append(step)
            continue
        understood.append(step)
    return understood, partial, unknown


def scan_steps(store: CheckpointRoot) -> tuple[list[int], list[int]]:
    """(committed steps, partial steps) under the root, each ascending; committed = has a record."""
    committed, partial = [], []
    for name in store.list_names():
        step = parse_step_dir(name)
        if step is None:
            continue
        names = store.list_names(store.join(name))
        (committed if COMMIT_NAME in names else partial).append(step)
    return sorted(committed), sorted(partial)
