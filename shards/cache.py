"""A node-local cache of remote shard files, keyed by checksum, bounded in bytes, written atomically.

Files are downloaded whole, checked against the manifest while streaming, renamed into place, and
evicted least-recently-used first. Every process of a node shares it: opening a cached file and
evicting one happen under one file lock, so a reader never loses a file between finding and mapping
it, and the byte limit holds for complete files plus the downloads in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat as stat_module
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from shards.errors import ChecksumMismatchError, ShardsError
from shards.manifest import ShardInfo
from shards.storage import Checksum

__all__ = ["ShardCache"]

_CHUNK_BYTES = 8 << 20
_LOCK_NAME = ".lock"
_PART_PREFIX = ".part-"
# a download that has not written for this long belongs to a process that died: its space is free
_STALE_PART_S = 600.0


class ShardCache:
    """Cache of whole shard files under ``directory`` holding at most ``max_bytes``."""

    def __init__(self, directory: str, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"cache_bytes ({max_bytes}) must be positive, or None for no limit")
        self.directory = os.fspath(directory)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.bytes_downloaded = 0

    def key(self, shard: ShardInfo) -> str:
        algorithm, _, digest = shard.checksum.partition(":")
        suffix = os.path.splitext(shard.path)[1]
        return f"{algorithm}-{digest}-{shard.bytes}{suffix}"

    def open(
        self, fs: Any, remote_path: str, shard: ShardInfo, url: str
    ) -> tuple[str, pa.MemoryMappedFile]:
        """The cached file of ``shard``, memory-mapped (downloaded first on a miss), and its path.

        The mapping stays valid after an eviction unlinks the file; a file evicted while this
        process downloaded something else is fetched again.
        """
        if self.max_bytes is not None and shard.bytes > self.max_bytes:
            raise ShardsError(
                f"shard {url} has {shard.bytes} bytes, more than cache_bytes ({self.max_bytes}); "
                "raise cache_bytes or write smaller shards (bytes_per_shard)"
            )
        local = os.path.join(self.directory, self.key(shard))
        os.makedirs(self.directory, exist_ok=True)
        with self._locked():
            mapped = self._map_if_cached(local)
            if mapped is not None:
                self.hits += 1
                return local, mapped
            self._make_room(shard.bytes)
            # the partial file's name carries its final size: a reservation other processes count
            fd, part = tempfile.mkstemp(prefix=f"{_PART_PREFIX}{shard.bytes}-", dir=self.directory)
        self.misses += 1
        try:
            with os.fdopen(fd, "wb") as out:
                self._download(fs, remote_path, shard, url, out)
            with self._locked():
                self._make_room(shard.bytes, exclude=part)
                os.replace(part, local)
                mapped = pa.memory_map(local, "r")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
        self.bytes_downloaded += shard.bytes
        return local, mapped

    def _download(self, fs: Any, remote_path: str, shard: ShardInfo, url: str, out: Any) -> None:
        checksum, size = Checksum(), 0
        with fs.open(remote_path, "rb") as remote:
            while chunk := remote.read(_CHUNK_BYTES):
                checksum.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size != shard.bytes or checksum.hexdigest() != shard.checksum:
            raise ChecksumMismatchError(
                f"shard {url}: downloaded {size} bytes with checksum {checksum.hexdigest()}, the "
                f"manifest expects {shard.bytes} bytes with {shard.checksum}; the remote file changed "
                "after the manifest was written - re-run `shards write`, or `shards verify` to list "
                "every changed shard"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The node-wide cache lock (flock: per open file, so threads exclude each other too)."""
        fd = os.open(os.path.join(self.directory, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _map_if_cached(self, local: str) -> pa.MemoryMappedFile | None:
        try:
            os.utime(local)  # the mtime is the LRU clock
            return pa.memory_map(local, "r")
        except FileNotFoundError:
            return None

    def entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes, mtime) of every complete cached file."""
        found = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith("."):  # downloads in flight, the lock, the record of checked groups
                continue
            path = os.path.join(self.directory, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            if stat_module.S_ISREG(stat.st_mode):
                found.append((path, stat.st_size, stat.st_mtime))
        return found

    def _reserved_bytes(self, exclude: str | None) -> int:
        """Final sizes of downloads in flight (their partial files' names carry them)."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if not name.startswith(_PART_PREFIX) or path == exclude:
                    continue
                size = name[len(_PART_PREFIX) :].split("-", 1)[0]
                try:
                    if time.time() - os.stat(path).st_mtime > _STALE_PART_S:
                        os.unlink(path)  # left by a process that died mid-download
                        continue
                except FileNotFoundError:
                    continue
                total += int(size) if size.isdigit() else 0
        return total

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _make_room(self, incoming: int, exclude: str | None = None) -> None:
        """Evict least recently used files until ``incoming`` more bytes fit (under the lock)."""
        if self.max_bytes is None:
            return
        entries = sorted(self.entries(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in entries) + self._reserved_bytes(exclude)
        for path, size, _ in entries:
            if total + incoming <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
