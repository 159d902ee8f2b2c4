"""A node-local cache of remote shard files, keyed by checksum, bounded in bytes, written atomically.

Files are downloaded whole, checked against the manifest while streaming, renamed into place, and
evicted least-recently-used first. Deleting a file another process has memory-mapped is safe on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_module
import tempfile
from typing import Any

from shards.errors import ChecksumMismatchError, ShardsError
from shards.manifest import ShardInfo
from shards.storage import Checksum

__all__ = ["ShardCache"]

_CHUNK_BYTES = 8 << 20


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

    def path(self, fs: Any, remote_path: str, shard: ShardInfo, url: str) -> str:
        """Local path of ``shard``, downloading it first on a miss."""
        if self.max_bytes is not None and shard.bytes > self.max_bytes:
            raise ShardsError(
                f"shard {url} has {shard.bytes} bytes, more than cache_bytes ({self.max_bytes}); "
                "raise cache_bytes or write smaller shards (bytes_per_shard)"
            )
        local = os.path.join(self.directory, self.key(shard))
        try:
            os.utime(local)  # the mtime is the LRU clock
            self.hits += 1
            return local
        except FileNotFoundError:
            pass
        self.misses += 1
        os.makedirs(self.directory, exist_ok=True)
        self._evict(keep_free=shard.bytes)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.directory)
        checksum, size = Checksum(), 0
        try:
            with os.fdopen(fd, "wb") as out, fs.open(remote_path, "rb") as remote:
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
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.bytes_downloaded += size
        return local

    def entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes, mtime) of every complete cached file."""
        found = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith("."):  # partial downloads, the record of checked row groups
                continue
            path = os.path.join(self.directory, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            if stat_module.S_ISREG(stat.st_mode):
                found.append((path, stat.st_size, stat.st_mtime))
        return found

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _evict(self, keep_free: int) -> None:
        if self.max_bytes is None:
            return
        entries = sorted(self.entries(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total + keep_free <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
