"""Peer replication of memory snapshots from a worker: the ring of replica servers, the background
pusher, and the lookup of a rank's replicas for restore.

Bytes move through ``trainkit.checkpoint.peer`` (authenticated, never unpickled); this module only
decides where each snapshot goes and keeps the push off the training thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

__all__ = ["Address", "Replicator", "find_replicas", "ring_target"]

logger = logging.getLogger("trainkit.checkpoint.manager")

Address = tuple[str, int]


def ring_target(node_rank: int, servers: Mapping[int, Address]) -> Address | None:
    """The replica server that node ``node_rank`` pushes to: the next node rank in the ring (by
    sorted node rank, wrapping); None when no other node has a server."""
    nodes = sorted(servers)
    if node_rank not in servers or len(nodes) < 2:
        return None
    return servers[nodes[(nodes.index(node_rank) + 1) % len(nodes)]]


def find_replicas(
    servers: Mapping[int, Address], token: bytes, owner: str, *, timeout_s: float = 5.0
) -> dict[int, Address]:
    """Complete replica steps of ``owner`` on any of ``servers`` (step -> a server holding it).

    A server that does not answer is skipped with a warning: it may be the pod that was lost.
    """
    from trainkit.checkpoint.peer import ReplicationError, list_snapshots

    found: dict[int, Address] = {}
    for node in sorted(servers):
        address = servers[node]
        try:
            steps = list_snapshots(address, token, owner=owner, timeout_s=timeout_s)
        except (ReplicationError, OSError) as error:
            logger.warning("trainkit: replica server of node %d unavailable: %s", node, error)
            continue
        for step in steps:
            found.setdefault(step, address)
    return found


class Replicator:
    """Pushes the newest committed memory snapshot of one rank to ``target`` in a background thread.

    ``offer`` never blocks: a snapshot offered while another is being pushed replaces the waiting
    one, so the replica trails by at most one push. ``protect(steps)`` keeps the steps pending or
    being pushed out of the memory tier's retention.
    """

    def __init__(
        self,
        target: Address,
        token: bytes,
        *,
        owner: str,
        rate_bytes_per_s: float | None,
        protect: Callable[[Iterable[int]], None],
    ) -> None:
        self.target = target
        self.owner = owner
        self._token = token
        self._rate = rate_bytes_per_s
        self._protect = protect
        self._pending: tuple[int, str] | None = None
        self._pushing: int | None = None
        self._wake = threading.Condition()
        self._closed = False
        self.replicated_step: int | None = None
        self.newest_offered: int | None = None
        self.bytes_sent = 0
        self.seconds = 0.0
        self.num_failures = 0
        self._thread = threading.Thread(
            target=self._run, name="trainkit-mem-replicate", daemon=True
        )
        self._thread.start()

    @property
    def lag_steps(self) -> int | None:
        """Steps between the newest memory snapshot and the newest replica (None before any)."""
        if self.newest_offered is None:
            return None
        return self.newest_offered - (
            self.replicated_step if self.replicated_step is not None else -1
        )

    def offer(self, step: int, directory: str) -> None:
        with self._wake:
            self._pending = (step, directory)
            self.newest_offered = step
            self._protect_in_use()
            self._wake.notify()

    def _protect_in_use(self) -> None:
        in_use = {self._pushing} if self._pushing is not None else set()
        if self._pending is not None:
            in_use.add(self._pending[0])
        self._protect(in_use)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is pending or being pushed; True when that happened in time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._wake:
            while self._pending is not None or self._pushing is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the push in progress, waiting at most ``timeout_s`` for it (a preempted pod's
        grace period is better spent elsewhere; a replica cut short stays invisible)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        from trainkit.checkpoint.peer import ReplicationError, push_snapshot

        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                step, directory = self._pending  # type: ignore[misc]
                self._pending = None
                self._pushing = step
            started = time.monotonic()
            try:
                sent = push_snapshot(
                    self.target,
                    self._token,
                    owner=self.owner,
                    step=step,
                    directory=directory,
                    rate_bytes_per_s=self._rate,
                )
            except (ReplicationError, OSError) as error:
                self.num_failures += 1
                logger.warning(
                    "trainkit: replicating memory snapshot of step %d to %s:%d failed: %s",
                    step,
                    *self.target,
                    error,
                )
            else:
                self.bytes_sent += sent
                self.seconds += time.monotonic() - started
                self.replicated_step = step
                _observe_replication(sent, time.monotonic() - started, self.lag_steps)
            finally:
                with self._wake:
                    self._pushing = None
                    self._protect_in_use()
                    self._wake.notify_all()


def _observe_replication(num_bytes: int, seconds: float, lag_steps: int | None) -> None:
    try:
        from trainkit.metrics import observe_checkpoint_tier
    except ImportError:
        return
    try:
        observe_checkpoint_tier(
            "peer", "save", num_bytes=num_bytes, seconds=seconds, lag_steps=lag_steps
        )
    except Exception:
        logger.exception("trainkit: recording replication metrics failed")
