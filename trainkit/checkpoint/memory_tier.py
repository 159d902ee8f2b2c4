"""The memory tier: each rank's whole step written as files under a pod-local /dev/shm directory.

A memory snapshot is the storage tier's step format (DCP files, the per-rank file, ``COMMIT.json``
last) on a root of its own per rank, written without collectives so no rank waits for another.
It never touches the storage root and never decides which tier a restore uses (see ``tiers``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trainkit.checkpoint.blocks import BufferPool
from trainkit.checkpoint.commit import COMMIT_NAME, classify_steps, step_dir_name
from trainkit.checkpoint.errors import CheckpointError
from trainkit.checkpoint.restore import Restorer
from trainkit.checkpoint.retention import plan_retention
from trainkit.checkpoint.root import CheckpointRoot
from trainkit.checkpoint.staging import HostStaging
from trainkit.checkpoint.writer import Snapshot, StepWriter

__all__ = [
    "DEFAULT_MEMORY_PARENT",
    "MemorySpaceError",
    "MemoryTier",
    "memory_bytes_needed",
    "owner_name",
    "state_bytes",
]

logger = logging.getLogger("trainkit.checkpoint.manager")

#: Where a memory root goes when trainkit-run did not choose one.
DEFAULT_MEMORY_PARENT = "/dev/shm"


class MemorySpaceError(CheckpointError):
    """The pod's /dev/shm cannot hold the memory tier's snapshots."""


def owner_name(rank: int, world_size: int, storage_url: str | None = None) -> str:
    """A rank's directory in the memory root and its name on a peer's replica server.

    The world size is part of it, so a snapshot of another world is never mistaken for this rank's,
    and so is a digest of the storage root: two managers (or an old job's leftovers in /dev/shm)
    with other roots never share snapshots.
    """
    name = f"rank-{rank}-of-{world_size}"
    if storage_url is None:
        return name
    digest = hashlib.sha256(storage_url.rstrip("/").encode()).hexdigest()[:12]
    return f"{name}.{digest}"


def state_bytes(tree: Any) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, Mapping):
        return sum(state_bytes(value) for value in tree.values())
    if isinstance(tree, list | tuple):
        return sum(state_bytes(value) for value in tree)
    return 0


def memory_bytes_needed(
    rank_bytes: int, *, num_local_ranks: int, keep: int, replicated: bool
) -> int:
    """Bytes /dev/shm must hold: ``keep`` snapshots plus one being written, per local rank, and as
    many again for the replicas this pod holds for its peer."""
    own = rank_bytes * num_local_ranks * (keep + 1)
    return own * 2 if replicated else own


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class _SoloWorld:
    """The world a memory snapshot is written in: this rank alone."""

    rank: int = 0
    world_size: int = 1
    is_main: bool = True


class _SoloGroups:
    """``CheckpointGroups`` of a world of one: memory snapshots need no collectives."""

    distributed = False
    save_group = None

    def agree_any(self, flag: bool) -> bool:
        return flag

    def agree_all(self, flag: bool) -> bool:
        return flag

    def broadcast(self, value: Any, *, background: bool = False) -> Any:
        return value

    def gather(self, value: Any) -> list[Any]:
        return [value]


class MemoryTier:
    """One rank's snapshots under ``<memory_root>/<owner>/step_<n>/``; ``keep`` committed ones kept.

    ``snapshot`` copies the state into reused host buffers (the only work on the training thread)
    and writes it in a background thread; ``on_commit(step, directory)`` runs there after the
    commit record is written (the replicator uses it).
    """

    def __init__(
        self,
        memory_root: str,
        *,
        owner: str,
        keep: int,
        capture_rng: bool,
        on_commit: Callable[[int, str], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"memory_keep ({keep}) must be at least 1")
        self.memory_root = memory_root
        self.owner = owner
        self.keep = keep
        self.directory = os.path.join(memory_root, owner)
        os.makedirs(self.directory, exist_ok=True)
        self.root = CheckpointRoot(self.directory)
        self._pool = BufferPool(num_buffers=3, block_bytes=8 << 20)  # its own: writers run at once
        self._staging = HostStaging()
        self._on_commit = on_commit
        self._writer = StepWriter(
            self.root,
            world=_SoloWorld(),
            groups=_SoloGroups(),
            pool=self._pool,
            on_commit=lambda step: None,
        )
        self._restorer = Restorer(
            self.root,
            world=_SoloWorld(),
            groups=_SoloGroups(),
            pool=self._pool,
            capture_rng=capture_rng,
        )
        self._thread: threading.Thread | None = None
        self._protected: set[int] = set()
        self._lock = threading.Lock()
        self.last_blocking_s: float | None = None
        self.last_write_s: float | None = None
        self.newest_step: int | None = None
        self.num_skipped = 0

    # ----- space ------------------------------------------------------------------------------

    def check_space(
        self, rank_bytes: int, *, num_local_ranks: int, replicated: bool, memory_interval: int
    ) -> int:
        """Raise ``MemorySpaceError`` when the filesystem of the memory root is too small; return
        the bytes needed."""
        needed = memory_bytes_needed(
            rank_bytes, num_local_ranks=num_local_ranks, keep=self.keep, replicated=replicated
        )
        total = shutil.disk_usage(self.memory_root).total
        if total < needed:
            raise MemorySpaceError(
                f"memory checkpoints need {_format_bytes(needed)} at {self.memory_root} "
                f"({_format_bytes(rank_bytes)} of state x {num_local_ranks} local rank(s) x "
                f"{self.keep + 1} snapshots{' x 2 for the peer replica' if replicated else ''}), "
                f"but its filesystem holds {_format_bytes(total)}; mount a larger /dev/shm (Kubernetes: "
                f"an emptyDir with medium: Memory at /dev/shm and sizeLimit >= {_format_bytes(needed)}), "
                "lower memory_keep, or pass memory_interval_steps=None "
                f"(now {memory_interval}) to turn memory snapshots off"
            )
        return needed

    # ----- save -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self, step: int, global_state: dict[str, Any], rank_bytes: bytes) -> bool:
        """Start writing ``step``; False (and nothing done) while the previous one is still written."""
        if self.busy:
            self.num_skipped += 1
            logger.info(
                "trainkit: memory snapshot of step %d skipped: step %s is still being written",
                step,
                self.newest_step,
            )
            return False
        self.wait()
        started = time.monotonic()
        staged = self._staging.copy(global_state)
        snapshot = Snapshot(step, staged, rank_bytes, started)
        snapshot.blocking_s = self.last_blocking_s = time.monotonic() - started
        self._thread = threading.Thread(
            target=self._write, args=(snapshot,), name=f"trainkit-mem-save-{step}", daemon=True
        )
        self._thread.start()
        return True

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, snapshot: Snapshot) -> None:
        step = snapshot.step
        try:
            self._remove_step(step)  # a snapshot of this step from a timeline that was rolled back
            self._writer.write(snapshot)
        except Exception as error:  # a lost memory snapshot costs nothing the next one does not fix
            logger.warning("trainkit: memory snapshot of step %d failed: %s", step, error)
            return
        self.last_write_s = time.monotonic() - snapshot.started
        self.newest_step = step
        self._remove_old_steps(step)
        if self._on_commit is not None:
            try:
                self._on_commit(step, self.step_directory(step))
            except Exception:
                logger.exception("trainkit: after the memory snapshot of step %d", step)

    def protect(self, steps: Iterable[int]) -> None:
        """Keep exactly ``steps`` out of retention (they are being replicated)."""
        with self._lock:
            self._protected = set(steps)

    def _remove_step(self, step: int) -> None:
        directory = self.step_directory(step)
        # The record goes first: a half-removed snapshot is then uncommitted, never corrupt-looking.
        self.root.remove_tree(f"{directory}/{COMMIT_NAME}")
        self.root.remove_tree(directory)

    def discard_newer_than(self, step: int | None) -> None:
        """Remove snapshots newer than the restored ``step`` (all when None): training goes on from
        ``step``, so they belong to a timeline that no longer exists."""
        self.wait()
        committed, partial, _ = classify_steps(self.root)
        for newer in sorted(set(committed) | set(partial)):
            if step is None or newer > step:
                self._remove_step(newer)

    def _remove_old_steps(self, newest: int) -> None:
        committed, partial, _ = classify_steps(self.root)
        with self._lock:
            protected = sorted(self._protected)
        for step in plan_retention(
            committed, partial, keep_last=self.keep, keep_every=None, in_flight=[newest, *protected]
        ):
            self._remove_step(step)

    # ----- restore ----------------------------------------------------------------------------

    def step_directory(self, step: int) -> str:
        return self.root.join(step_dir_name(step))

    def committed_steps(self) -> list[int]:
        """Steps whose commit record parses and whose files have their sizes, ascending."""
        return classify_steps(self.root)[0]

    def restore_step(self, step: int, state: Any) -> int:
        """Load ``step`` into ``state`` (this rank only); return the bytes it holds."""
        from trainkit.checkpoint.commit import read_commit

        self.wait()
        self._restorer.restore_step(step, state)
        return read_commit(self.root, self.step_directory(step), step).total_bytes

    def remove_all(self) -> None:
        self.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
