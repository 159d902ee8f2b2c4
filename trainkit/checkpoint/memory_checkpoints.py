"""The memory-first side of ``CheckpointManager``: when to snapshot into memory, where replicas go,
and a restore that agrees on one step and tier across ranks (own memory, a peer's replica, storage).

The storage tier stays in the manager; this module never writes to the storage root.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from trainkit.checkpoint.memory_tier import (
    DEFAULT_MEMORY_PARENT,
    MemoryTier,
    owner_name,
    state_bytes,
)
from trainkit.checkpoint.replication import Address, Replicator, find_replicas, ring_target
from trainkit.checkpoint.tiers import (
    TIER_MEMORY,
    TIER_PEER,
    TIER_STORAGE,
    RankHoldings,
    RestoreChoice,
    choose_restore,
)
from trainkit.env_vars import (
    MEMORY_ROOT_VARIABLE,
    REPLICA_ADDRESS_VARIABLE,
    read_memory_root,
    read_replica_address,
)
from trainkit.k8s.signed_state import JOB_TOKEN_VARIABLE

__all__ = ["MemoryCheckpoints", "resolve_memory_root"]

logger = logging.getLogger("trainkit.checkpoint.manager")


def resolve_memory_root(env: Mapping[str, str], run_id: str) -> str:
    """``TRAINKIT_MEMORY_ROOT`` (set by trainkit-run), else a directory of the run under /dev/shm."""
    chosen = read_memory_root(env)
    if chosen is not None:
        return chosen
    parent = DEFAULT_MEMORY_PARENT if os.path.isdir(DEFAULT_MEMORY_PARENT) else "/tmp"
    root = os.path.join(parent, f"trainkit-{run_id}-uid{os.getuid()}")
    logger.info(
        "trainkit: %s is not set (not started by trainkit-run); memory snapshots go to %s and "
        "nothing removes them at job end",
        MEMORY_ROOT_VARIABLE,
        root,
    )
    return root


class MemoryCheckpoints:
    """Memory snapshots every ``interval_steps`` (plus every storage save), replicated to the next
    node's replica server when ``replicate`` allows it; every rank constructs it together."""

    def __init__(
        self,
        *,
        world: Any,
        groups: Any,
        storage_url: str,
        interval_steps: int,
        keep: int,
        replicate: bool | str,
        capture_rng: bool,
        rate_bytes_per_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if interval_steps < 1:
            raise ValueError(
                f"memory_interval_steps ({interval_steps}) must be at least 1 (or None: no memory tier)"
            )
        if replicate not in (True, False, "auto"):
            raise ValueError(f"replicate ({replicate!r}) must be True, False or 'auto'")
        env = os.environ if env is None else env
        self.world = world
        self.groups = groups
        self.interval_steps = interval_steps
        self.owner = owner_name(world.rank, world.world_size, storage_url)
        self.tier = MemoryTier(
            resolve_memory_root(env, world.run_id),
            owner=self.owner,
            keep=keep,
            capture_rng=capture_rng,
            on_commit=self._after_commit,
        )
        self.servers, self.token = self._exchange_servers(env, replicate)
        target = ring_target(world.node_rank, self.servers)
        if replicate is True and target is None:
            raise ValueError(
                "replicate=True needs a replica server on at least two nodes (trainkit-run starts one "
                f"per pod when {JOB_TOKEN_VARIABLE} is set); pass replicate='auto' to replicate when "
                "possible"
            )
        self.replicator: Replicator | None = None
        if replicate and target is not None and self.token is not None:
            self.replicator = Replicator(
                target,
                self.token,
                owner=self.owner,
                rate_bytes_per_s=rate_bytes_per_s,
                protect=self.tier.protect,
            )
        self._space_checked = False
        self.last_restore: dict[str, Any] = {}

    def _exchange_servers(
        self, env: Mapping[str, str], replicate: bool | str
    ) -> tuple[dict[int, Address], bytes | None]:
        """Every node's replica server (node rank -> address), gathered over the manager's group."""
        if replicate is False:
            return {}, None
        from trainkit.k8s.signed_state import read_job_token

        token = read_job_token(env)
        own = read_replica_address(env) if token is not None else None
        if replicate is True and own is None:
            raise ValueError(
                f"replicate=True: this worker has no replica server ({REPLICA_ADDRESS_VARIABLE} and "
                f"{JOB_TOKEN_VARIABLE} unset); start it with trainkit-run and set {JOB_TOKEN_VARIABLE} "
                "from a Secret, or pass replicate='auto'"
            )
        gathered = _gather_on_agree_group(self.groups, (self.world.node_rank, own))
        servers = {node: tuple(address) for node, address in gathered if address is not None}
        return servers, token  # type: ignore[return-value]

    # ----- save -------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step % self.interval_steps == 0

    def snapshot(self, step: int, global_state: dict[str, Any], rank_bytes: bytes) -> bool:
        """Start the memory snapshot of ``step``; the copy is the only blocking work."""
        num_bytes = state_bytes(global_state) + len(rank_bytes)
        if not self._space_checked:
            self.check_space(num_bytes)
        started = time.monotonic()
        started_write = self.tier.snapshot(step, global_state, rank_bytes)
        if started_write:
            _observe(TIER_MEMORY, "save", num_bytes, time.monotonic() - started)
        return started_write

    def check_space(self, rank_bytes: int) -> None:
        self._space_checked = True
        self.tier.check_space(
            rank_bytes,
            num_local_ranks=self.world.local_world_size,
            replicated=bool(self.servers) and self.replicator is not None,
            memory_interval=self.interval_steps,
        )

    def _after_commit(self, step: int, directory: str) -> None:
        if self.replicator is not None:
            self.replicator.offer(step, directory)

    @property
    def replication_lag_steps(self) -> int | None:
        return None if self.replicator is None else self.replicator.lag_steps

    def wait(self, *, replicas: bool = False, timeout_s: float | None = None) -> None:
        """Wait for the snapshot being written (and, with ``replicas``, for its push to the peer)."""
        self.tier.wait()
        if replicas and self.replicator is not None:
            self.replicator.drain(timeout_s)

    def close(self) -> None:
        self.tier.wait()
        if self.replicator is not None:
            self.replicator.close()

    # ----- restore ----------------------------------------------------------------------------

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        storage_steps: Callable[[], list[int]],
        restore_from_storage: Callable[[MutableMapping[str, Any]], int | None],
    ) -> int | None:
        """Load the newest step every rank can load from some tier into ``state``; every rank calls it.

        The first call also checks that /dev/shm can hold the snapshots of ``state`` (at start, not
        at the first snapshot minutes later).
        """
        from trainkit.checkpoint.layout import split_state

        if not self._space_checked:
            self.check_space(state_bytes(split_state(state, per_rank=False)[0]))
        self.tier.wait()
        own = self.tier.committed_steps()
        peer: dict[int, Address] = {}
        if self.token is not None and self.servers:
            peer = find_replicas(self.servers, self.token, self.owner)
        gathered = _gather_on_agree_group(self.groups, (own, peer))
        holdings = [RankHoldings.of(rank_own, rank_peer) for rank_own, rank_peer in gathered]
        choice = choose_restore(holdings, self._storage_steps(storage_steps))
        if choice.tier == TIER_MEMORY:
            step = self._restore_from_memory(choice, state)
            if step is not None:
                self.tier.discard_newer_than(step)
                return step
        elif choice.step is not None:
            self._warn_fallback(
                "no step has a complete memory copy on every rank (own memory or a peer's replica)"
            )
        started = time.monotonic()
        step = restore_from_storage(state)
        if step is not None:
            self.last_restore = {"tier": TIER_STORAGE, "step": step}
            _observe(TIER_STORAGE, "restore", 0, time.monotonic() - started)
        self.tier.discard_newer_than(step)
        return step

    def _storage_steps(self, storage_steps: Callable[[], list[int]]) -> list[int]:
        """Committed storage steps (rank 0 lists, a metadata request; no checkpoint data is read):
        a preemption save goes to storage only and may be newer than every memory snapshot."""
        steps = storage_steps() if self.world.is_main else None
        return self.groups.broadcast(steps) or []

    def _restore_from_memory(
        self, choice: RestoreChoice, state: MutableMapping[str, Any]
    ) -> int | None:
        assert choice.step is not None
        step = choice.step
        tier = choice.rank_tier(self.world.rank)
        started = time.monotonic()
        problem: str | None = None
        num_bytes = 0
        try:
            if tier == TIER_PEER:
                self._fetch_replica(step, choice.fetch[self.world.rank])
            num_bytes = self.tier.restore_step(step, state)
        except Exception as error:
            problem = f"rank {self.world.rank} ({tier}): {type(error).__name__}: {error}"
            logger.warning(
                "trainkit: restoring memory snapshot of step %d failed: %s", step, problem
            )
        problems = [p for p in _gather_on_agree_group(self.groups, problem) if p]
        if problems:
            self._warn_fallback(f"the memory copy of step {step} failed: {'; '.join(problems)}")
            return None
        seconds = time.monotonic() - started
        self.last_restore = {"tier": tier, "step": step, "bytes": num_bytes, "seconds": seconds}
        _observe(tier, "restore", num_bytes, seconds)
        logger.info(
            "trainkit: restored step %d from %s (%d bytes in %.3f s)",
            step,
            tier,
            num_bytes,
            seconds,
        )
        return step

    def _fetch_replica(self, step: int, address: Address) -> None:
        from trainkit.checkpoint.peer import fetch_snapshot

        assert self.token is not None
        destination = self.tier.step_directory(step)
        shutil.rmtree(destination, ignore_errors=True)
        started = time.monotonic()
        num_bytes = fetch_snapshot(
            address, self.token, owner=self.owner, step=step, dest=destination
        )
        _observe(TIER_PEER, "fetch", num_bytes, time.monotonic() - started)

    def _warn_fallback(self, reason: str) -> None:
        if not self.world.is_main:
            return
        message = f"trainkit: {reason}; restoring from the storage tier"
        warnings.warn(message, stacklevel=4)
        logger.warning(message)


def _observe(tier: str, operation: str, num_bytes: int, seconds: float) -> None:
    try:
        from trainkit.metrics import observe_checkpoint_tier
    except ImportError:
        return
    try:
        observe_checkpoint_tier(tier, operation, num_bytes=num_bytes, seconds=seconds)
    except Exception:
        logger.exception("trainkit: recording checkpoint tier metrics failed")


def _gather_on_agree_group(groups: Any, value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order, over the training thread's group (the writer's group
    may be busy with a background storage save)."""
    if not groups.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * groups.world_size
    dist.all_gather_object(out, value, group=groups.agree_group)
    return out
