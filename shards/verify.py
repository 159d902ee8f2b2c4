"""``verify_dataset``: read every shard whole and compare sizes, checksums and schemas with the manifest.

Reports every problem instead of stopping at the first; never repairs anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shards.errors import ShardsError, UnsafePathError
from shards.manifest import Manifest
from shards.reader import ShardReader
from shards.storage import Checksum, resolve_location

__all__ = ["ShardProblem", "verify_dataset"]

_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardProblem:
    url: str
    problem: str


def verify_dataset(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> list[ShardProblem]:
    """Every shard problem of the dataset at ``url`` (empty when the dataset is intact)."""
    location = resolve_location(url, storage_options)
    manifest = Manifest.load_from(location)
    problems: list[ShardProblem] = []
    reader = ShardReader(manifest, location, manifest.schema.names)
    for shard_id, shard in enumerate(manifest.shards):
        shard_url = location.url_of(shard.path)
        checksum, size = Checksum(), 0
        try:
            path = location.path_of(shard.path)
        except UnsafePathError as exc:
            problems.append(ShardProblem(shard_url, str(exc)))
            continue
        try:
            with location.fs.open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK_BYTES):
                    checksum.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            problems.append(ShardProblem(shard_url, "missing"))
            continue
        found = []
        if size != shard.bytes:
            found.append(f"size {size} bytes, manifest says {shard.bytes}")
        elif checksum.hexdigest() != shard.checksum:
            found.append(f"checksum {checksum.hexdigest()}, manifest says {shard.checksum}")
        first = int(manifest.table.rg_start[shard_id])
        try:
            reader._open(shard_id)
            for rg_id in range(first, first + len(shard.row_groups)):
                reader.load(rg_id)
        except ShardsError as exc:
            found.append(str(exc))
        if found:
            problems.append(ShardProblem(shard_url, "; ".join(found)))
    return problems
