"""The checkpoint manager's own CPU (gloo) process groups and the few collectives it runs on them.

One group for the training thread (agreement, restore) and one for the background writer, so their
collectives never interleave with each other or with training's. A world of one has no groups.
"""

from __future__ import annotations

from typing import Any

from trainkit.dist import collective_timeout
from trainkit.preemption import agree_any

__all__ = ["CheckpointGroups"]


class CheckpointGroups:
    """Collectives over the manager's groups; every method is a no-op in a world of one."""

    def __init__(self, world_size: int) -> None:
        import torch.distributed as dist

        self.world_size = world_size
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed and dist.get_world_size() != world_size:
            raise ValueError(
                f"world_size mismatch: the process group has {dist.get_world_size()} ranks, the World "
                f"{world_size}; pass the World that trainkit.init() returned"
            )
        # With trainkit.init()'s timeout, not torch's 30 min: a rank blocked here on a lost peer
        # fails as soon as its training collectives would.
        timeout = collective_timeout()
        self.agree_group = (
            dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        )
        self.save_group = (
            dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        )

    def agree_any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank (training thread's group)."""
        return agree_any(flag, self.agree_group)

    def agree_all(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank (training thread's group)."""
        return not self.agree_any(not flag)

    def broadcast(self, value: Any, *, background: bool = False) -> Any:
        """Rank 0's ``value`` on every rank; ``background`` uses the writer's group."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        group = self.save_group if background else self.agree_group
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` in rank order, on every rank (writer's group)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.save_group)
        return out
