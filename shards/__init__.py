"""shards: sharded Arrow datasets with exactly-once, elastic, resumable streaming into PyTorch.

``import shards`` is cheap and torch-free; the torch-facing ``ShardedDataset``/``ShardedLoader`` and
``TokenWindowDataset`` are imported on first use.
"""

from __future__ import annotations

from typing import Any

from shards.errors import (
    ChecksumMismatchError,
    ManifestError,
    SchemaDriftError,
    ShardsError,
    UnsafePathError,
)
from shards.manifest import Manifest, RowGroupInfo, ShardInfo
from shards.options import RankWorld, ReadOptions, WorldLike
from shards.writer import write_shards

__all__ = [
    "ChecksumMismatchError",
    "EpochIteration",
    "Manifest",
    "ManifestError",
    "RankWorld",
    "ReadOptions",
    "RowGroupInfo",
    "SchemaDriftError",
    "ShardInfo",
    "ShardedDataset",
    "ShardedLoader",
    "ShardsError",
    "TokenWindowDataset",
    "UnsafePathError",
    "WorldLike",
    "verify_dataset",
    "write_shards",
]

_LAZY = {
    "ShardedDataset": "shards.dataset",
    "EpochIteration": "shards.dataset",
    "ShardedLoader": "shards.loader",
    "TokenWindowDataset": "shards.tokens",
    "verify_dataset": "shards.verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
