"""Checksummed block streams: files written and read as fixed-size blocks, each with a checksum.

Blocks are xxh3 or CRC32 checked, written with direct I/O and fsync on local disks and as plain
uploads to object stores. This module never decides what is committed or where the root is.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import shutil
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainkit.checkpoint.errors import CorruptCheckpointError

if TYPE_CHECKING:
    from trainkit.checkpoint.root import CheckpointRoot

__all__ = [
    "BLOCK_BYTES",
    "BlockWriter",
    "BufferPool",
    "CancelledError",
    "FileInfo",
    "read_file_ranges",
    "verify_file",
    "with_path",
    "write_file",
]

#: Checksum and I/O granularity: large sequential writes, one checksum per block.
BLOCK_BYTES = 32 << 20
_DIRECT_ALIGN = 4096


def _format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    raise AssertionError("unreachable")


def with_path(error: OSError, path: str) -> OSError:
    """``error`` naming ``path`` (``os.write`` errors name no file) and, for a full volume, the space
    left on it; errors that already name a file are returned as they are."""
    if error.filename is not None:
        return error
    message = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
        except OSError:
            pass
        else:
            message = f"{message} ({_format_bytes(free)} free on that volume)"
    annotated = OSError(error.errno, message, path)
    annotated.__cause__ = error
    return annotated


class CancelledError(Exception):
    """A write was stopped on purpose (an in-flight save abandoned at preemption)."""


def _xxh3_64(data: Any) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(data)


#: Block checksums by name; xxh3_64 (~15 GB/s) when the xxhash package is present, else CRC32.
CHECKSUMS: dict[str, Callable[[Any], int]] = {"xxh3_64": _xxh3_64, "crc32": zlib.crc32}


def default_checksum() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def checksum_function(name: str, *, step: int | None = None) -> Callable[[Any], int]:
    if name not in CHECKSUMS:
        raise CorruptCheckpointError(
            step, f"unknown block checksum {name!r} (known: {', '.join(CHECKSUMS)})"
        )
    if name == "xxh3_64" and default_checksum() != "xxh3_64":
        raise CorruptCheckpointError(
            step,
            "this checkpoint uses xxh3_64 block checksums and the xxhash package is missing: "
            "pip install xxhash",
        )
    return CHECKSUMS[name]


@dataclass
class FileInfo:
    """A written file: its size and the checksum of each ``block_bytes`` block, in order."""

    size: int
    block_checksums: list[int] = field(default_factory=list)
    block_bytes: int = BLOCK_BYTES
    checksum: str = field(default_factory=default_checksum)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "block_bytes": self.block_bytes,
            "checksum": self.checksum,
            "block_checksums": self.block_checksums,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileInfo:
        return cls(
            size=int(data["size"]),
            block_checksums=[int(c) for c in data["block_checksums"]],
            block_bytes=int(data["block_bytes"]),
            checksum=str(data["checksum"]),
        )


class BufferPool:
    """Page-aligned host buffers reused by every save and restore (fresh pages are slow to touch)."""

    def __init__(self, num_buffers: int = 3, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self.num_buffers = num_buffers
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def buffers(self) -> list[mmap.mmap]:
        with self._lock:
            if not self._buffers:
                self._buffers = [mmap.mmap(-1, self.block_bytes) for _ in range(self.num_buffers)]
            return list(self._buffers)


def _open_for_write(path: str) -> tuple[int, bool]:
    """Open ``path`` for writing with O_DIRECT when the filesystem allows it (not tmpfs, not macOS)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError:
            pass
    return os.open(path, flags, 0o644), False


def _copy_bytes(dest: memoryview, source: memoryview) -> None:
    """memcpy that lets the I/O thread run meanwhile (numpy drops the GIL; slice assignment does not)."""
    if len(source) < (1 << 20):
        dest[:] = source
        return
    import numpy as np

    np.copyto(np.frombuffer(dest, dtype=np.uint8), np.frombuffer(source, dtype=np.uint8))


class BlockWriter:
    """Stream bytes into one file: the caller copies and checksums blocks, a thread writes them."""

    def __init__(
        self,
        store: CheckpointRoot,
        path: str,
        pool: BufferPool,
        cancel: threading.Event | None = None,
    ) -> None:
        self.path = path
        self._cancel = cancel
        self.block_bytes = pool.block_bytes
        self.info = FileInfo(size=0, block_bytes=pool.block_bytes)
        self._checksum = CHECKSUMS[self.info.checksum]
        self._local = store.is_local
        if self._local:
            try:
                self._fd, self._direct = _open_for_write(path)
            except OSError as error:
                raise with_path(error, path) from None
            self._file = None
        else:
            self._fd, self._direct = -1, False
            self._file = store.fs.open(path, "wb")
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for buffer in pool.buffers():
            self._free.put(buffer)
        self._full: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._current: memoryview | None = None
        self._current_buffer: mmap.mmap | None = None
        self._fill = 0
        self._thread = threading.Thread(target=self._drain, name="trainkit-ckpt-io", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            entry = self._full.get()
            if entry is None:
                return
            buffer, length = entry
            try:
                if self._error is None:
                    self._write_out(memoryview(buffer)[:length])
            except OSError as error:  # reported by write() or close()
                self._error = with_path(error, self.path)
            except BaseException as error:
                self._error = error
            finally:
                self._free.put(buffer)

    def _write_out(self, view: memoryview) -> None:
        if self._file is not None:
            self._file.write(view)
            return
        if self._direct and len(view) % _DIRECT_ALIGN:
            padded = -(-len(view) // _DIRECT_ALIGN) * _DIRECT_ALIGN
            view.obj[len(view) : padded] = bytes(padded - len(view))  # type: ignore[index]
            view = memoryview(view.obj)[:padded]
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])

    def write(self, data: memoryview | bytes) -> None:
        """Append ``data`` (any C-contiguous buffer) to the file."""
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view):
            if self._current is None:
                self._current_buffer = self._free.get()
                self._current = memoryview(self._current_buffer)
                self._fill = 0
            count = min(len(view) - position, self.block_bytes - self._fill)
            _copy_bytes(
                self._current[self._fill : self._fill + count], view[position : position + count]
            )
            self._fill += count
            position += count
            if self._fill == self.block_bytes:
                if self._cancel is not None and self._cancel.is_set():
                    raise CancelledError(f"writing {self.path} was cancelled")
                self._submit()
        if self._error is not None:
            raise self._error

    def _submit(self) -> None:
        assert self._current is not None and self._current_buffer is not None
        self.info.block_checksums.append(self._checksum(self._current[: self._fill]))
        self.info.size += self._fill
        self._current.release()
        self._full.put((self._current_buffer, self._fill))
        self._current = None
        self._current_buffer = None

    def close(self) -> FileInfo:
        """Write the last block, make the file durable, and return its size and checksums."""
        if self._current is not None and self._fill:
            self._submit()
        elif self._current is not None:
            self._current.release()
            self._free.put(self._current_buffer)  # type: ignore[arg-type]
            self._current = None
        self._full.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            if self._file is not None:
                self._file.close()
            else:
                if self._direct:
                    os.ftruncate(self._fd, self.info.size)  # drop the alignment padding
                os.fsync(self._fd)
        except OSError as error:
            raise with_path(error, self.path) from None
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        return self.info

    def abort(self) -> None:
        """Stop without making anything durable (the step stays uncommitted)."""
        self._error = self._error or RuntimeError("aborted")
        if self._current is not None:
            self._current.release()
            self._free.put(self._current_buffer)  # type: ignore[arg-type]
            self._current = None
        self._full.put(None)
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._file is not None:
            with contextlib.suppress(Exception):
                # Object stores: drop the multipart upload instead of publishing half a file.
                discard = getattr(self._file, "discard", None)
                discard() if callable(discard) else self._file.close()


def read_file_ranges(
    store: CheckpointRoot,
    path: str,
    info: FileInfo,
    ranges: Iterable[tuple[int, memoryview]],
    pool: BufferPool,
    *,
    step: int | None = None,
    direct: bool = True,
) -> None:
    """Fill each ``(offset, destination)`` from the file, verifying the checksum of every block read.

    Only blocks that some range touches are read. A block lying inside one destination is read
    straight into it (no copy) unless ``direct`` is False; others go through a pooled buffer. A
    block whose checksum differs raises ``CorruptCheckpointError`` naming the file and block.
    """
    checksum = checksum_function(info.checksum, step=step)
    ordered = sorted(
        ((offset, memoryview(dest).cast("B")) for offset, dest in ranges), key=lambda r: r[0]
    )
    block = info.block_bytes
    needed: list[int] = []
    for offset, dest in ordered:
        if offset + len(dest) > info.size:
            raise CorruptCheckpointError(
                step,
                f"{store.display(path)}: bytes {offset}..{offset + len(dest)} lie past the file's "
                f"recorded size {info.size}; the checkpoint is damaged - restore an older step",
            )
        if len(dest):
            first, last = offset // block, (offset + len(dest) - 1) // block
            needed.extend(range(max(first, needed[-1] + 1 if needed else first), last + 1))
    if not needed:
        return
    # For each needed block: the destination slice it can be read into directly, if any.
    targets: dict[int, memoryview] = {}
    if direct:
        cursor = 0
        for index in needed:
            start, end = index * block, min((index + 1) * block, info.size)
            while cursor < len(ordered) and ordered[cursor][0] + len(ordered[cursor][1]) <= start:
                cursor += 1
            if cursor < len(ordered):
                offset, dest = ordered[cursor]
                if offset <= start and end <= offset + len(dest):
                    targets[index] = dest[start - offset : end - offset]
    buffers = pool.buffers()
    stop = threading.Event()
    filled: queue.Queue[tuple[int, memoryview, mmap.mmap | None] | BaseException | None] = (
        queue.Queue(maxsize=len(buffers) - 1)
    )
    free: queue.Queue[mmap.mmap] = queue.Queue()
    for buffer in buffers:
        free.put(buffer)

    def read_blocks() -> None:
        try:
            with store.open_read(path) as handle:
                for index in needed:
                    if stop.is_set():
                        break
                    length = min(block, info.size - index * block)
                    buffer = None
                    view = targets.get(index)
                    if view is None:
                        buffer = free.get()
                        view = memoryview(buffer)[:length]
                    handle.seek(index * block)
                    got = 0
                    while got < length:
                        count = handle.readinto(view[got:])
                        if not count:
                            raise CorruptCheckpointError(
                                step,
                                f"{store.display(path)}: file ends at byte {index * block + got}, the "
                                f"commit record says {info.size}; the checkpoint is damaged - restore an older step",
                            )
                        got += count
                    filled.put((index, view, buffer))
            filled.put(None)
        except BaseException as error:
            filled.put(error)

    reader = threading.Thread(target=read_blocks, name="trainkit-ckpt-read", daemon=True)
    reader.start()
    cursor = 0
    try:
        while True:
            entry = filled.get()
            if entry is None:
                break
            if isinstance(entry, BaseException):
                raise entry
            index, view, buffer = entry
            value = checksum(view)
            expected = info.block_checksums[index] if index < len(info.block_checksums) else None
            if value != expected:
                raise CorruptCheckpointError(
                    step,
                    f"{store.display(path)}: block {index} checksum mismatch ({info.checksum} expected "
                    f"{expected}, got {value}); the file changed after it was committed - restore an older "
                    "step or run `trainkit ckpt verify`",
                )
            if buffer is None:
                continue
            start, end = index * block, index * block + len(view)
            while cursor < len(ordered) and ordered[cursor][0] + len(ordered[cursor][1]) <= start:
                cursor += 1
            for offset, dest in ordered[cursor:]:
                if offset >= end:
                    break
                lo, hi = max(offset, start), min(offset + len(dest), end)
                if lo < hi:
                    _copy_bytes(dest[lo - offset : hi - offset], view[lo - start : hi - start])
            view.release()
            free.put(buffer)
    finally:
        stop.set()
        while reader.is_alive():
            # Unblock the reader if we stopped early, then let it finish.
            with contextlib.suppress(queue.Empty):
                entry = filled.get(timeout=0.05)
                if isinstance(entry, tuple) and entry[2] is not None:
                    free.put(entry[2])
        reader.join()


def write_file(
    store: CheckpointRoot, path: str, chunks: Iterable[memoryview | bytes], pool: BufferPool
) -> FileInfo:
    """Write ``chunks`` to ``path`` through a ``BlockWriter``; the file is durable when this returns."""
    writer = BlockWriter(store, path, pool)
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def verify_file(
    store: CheckpointRoot, path: str, info: FileInfo, pool: BufferPool, *, step: int | None = None
) -> None:
    """Read a whole file and check its size and every block checksum."""
    actual = store.size(path)
    if actual != info.size:
        raise CorruptCheckpointError(
            step,
            f"{store.display(path)}: size {actual} bytes, the commit record says {info.size}; "
            "the file was truncated or replaced - restore an older step",
        )
    if len(info.block_checksums) != -(-info.size // info.block_bytes):
        raise CorruptCheckpointError(
            step,
            f"{store.display(path)}: the commit record lists {len(info.block_checksums)} block "
            f"checksums for {info.size} bytes; the record is damaged - restore an older step",
        )
    sink = memoryview(bytearray(min(info.size, info.block_bytes)))
    ranges = [
        (
            index * info.block_bytes,
            sink[: min(info.block_bytes, info.size - index * info.block_bytes)],
        )
        for index in range(len(info.block_checksums))
    ]
    read_file_ranges(store, path, info, ranges, pool, step=step, direct=False)
