"""The values a ``ShardedDataset`` is configured with: who is reading (``RankWorld``) and how files are
read (``ReadOptions``). Both are plain, validated at construction, and read the environment only in
``RankWorld.from_env``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_MAX_OPEN_FILES",
    "DEFAULT_READAHEAD_BYTES",
    "RankWorld",
    "ReadOptions",
    "WorldLike",
    "default_world",
]

DEFAULT_READAHEAD_BYTES = 256 << 20
# open shards kept per reading process (memory maps and Parquet footers); a DataLoader worker holds
# its own, so the whole job stays far below the usual `ulimit -n` of 1024 and the kernel's map count
DEFAULT_MAX_OPEN_FILES = 64


@runtime_checkable
class WorldLike(Protocol):
    """What a dataset needs to know about the job: this process's rank and the number of ranks.

    ``trainkit.World`` satisfies it, as does any object with these two attributes.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...


@dataclass(frozen=True)
class RankWorld:
    """A rank and a world size, checked: ``0 <= rank < world_size``."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank {self.rank} is outside the world of {self.world_size}; "
                "rank must be in [0, world_size)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankWorld:
        """RANK and WORLD_SIZE as every torchrun-compatible launcher sets them; a world of one without."""
        env = os.environ if env is None else env
        values = {
            name: env.get(name, default) for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"))
        }
        try:
            return cls(int(values["RANK"]), int(values["WORLD_SIZE"]))
        except ValueError as exc:
            raise ValueError(
                f"RANK={values['RANK']!r} and WORLD_SIZE={values['WORLD_SIZE']!r} do not form a world "
                f"({exc}); launch with torchrun/trainkit-run or pass world= explicitly"
            ) from None


def default_world() -> RankWorld:
    """This process's place in the job when no ``world`` is given: torch.distributed's rank and size
    once it is initialised, else RANK/WORLD_SIZE from the environment (read once, here)."""
    import torch.distributed as dist  # here, not at import: `import shards` stays torch-free

    if dist.is_available() and dist.is_initialized():
        return RankWorld(dist.get_rank(), dist.get_world_size())
    return RankWorld.from_env()


def check_world(world: WorldLike) -> RankWorld:
    """``world`` as a checked ``RankWorld``; names what is wrong with anything else."""
    if not isinstance(world, WorldLike):
        raise ValueError(
            f"world={world!r} has no rank/world_size attributes; pass trainkit.World, "
            "shards.RankWorld(rank, world_size) or None to read RANK/WORLD_SIZE"
        )
    return RankWorld(int(world.rank), int(world.world_size))


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How shard files are read. Defaults: no cache, 256 MiB readahead on 4 threads per reading
    process, every row group checked against its manifest checksum (``verify``), checks remembered
    per node and file version (``verify_marks``), at most 64 shards open per process.

    ``cache_dir`` caches remote shards whole on local disk, at most ``cache_bytes`` (None: no limit)
    shared by every process of the node; ``storage_options`` go to fsspec (credentials, endpoints).
    """

    cache_dir: str | None = None
    cache_bytes: int | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES
    readahead_threads: int = 4
    verify: bool = True
    verify_marks: bool = True
    max_open_files: int = DEFAULT_MAX_OPEN_FILES

    def __post_init__(self) -> None:
        if self.cache_bytes is not None and self.cache_dir is None:
            raise ValueError(
                f"cache_bytes={self.cache_bytes} needs cache_dir: the directory the cache lives in"
            )
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ValueError(
                f"cache_bytes ({self.cache_bytes}) must be positive, or None for no limit"
            )
        for name in ("readahead_bytes", "readahead_threads", "max_open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    @classmethod
    def with_overrides(cls, base: ReadOptions | None, overrides: Mapping[str, Any]) -> ReadOptions:
        """``base`` (default options when None) with keyword ``overrides`` by field name, as the
        dataset's keyword arguments ``cache_dir=``, ``readahead_bytes=`` ... are passed."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}; read options are {sorted(names)}"
            )
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        values.update(
            {k: v for k, v in overrides.items() if k != "storage_options" or v is not None}
        )
        return cls(**values)
