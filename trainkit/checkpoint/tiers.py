"""Which tier a restore reads: a pure function of what every rank holds and what storage committed.

The rule: the newest step of which every rank has a complete copy in its own memory or on a peer's
replica server, unless storage committed a newer one; otherwise the storage tier. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "TIER_MEMORY",
    "TIER_PEER",
    "TIER_STORAGE",
    "RankHoldings",
    "RestoreChoice",
    "choose_restore",
]

TIER_MEMORY = "memory"
TIER_PEER = "peer"
TIER_STORAGE = "storage"

Address = tuple[str, int]


@dataclass(frozen=True)
class RankHoldings:
    """What one rank can load without storage: steps in its own memory, and replicas on peers."""

    own: frozenset[int] = frozenset()
    peer: Mapping[int, Address] = field(default_factory=dict)  # step -> replica server holding it

    @classmethod
    def of(cls, own: Iterable[int] = (), peer: Mapping[int, Address] | None = None) -> RankHoldings:
        return cls(frozenset(own), dict(peer or {}))


@dataclass(frozen=True)
class RestoreChoice:
    """``tier`` is ``memory`` (each rank reads its own memory, fetching from ``fetch`` first) or
    ``storage`` (``step`` is then the newest committed storage step, None when there is none)."""

    tier: str
    step: int | None
    fetch: Mapping[int, Address] = field(
        default_factory=dict
    )  # rank -> replica server to pull from

    def rank_tier(self, rank: int) -> str:
        """Where ``rank``'s state comes from: ``memory``, ``peer`` or ``storage``."""
        if self.tier == TIER_STORAGE:
            return TIER_STORAGE
        return TIER_PEER if rank in self.fetch else TIER_MEMORY


def choose_restore(holdings: Sequence[RankHoldings], storage_steps: Iterable[int]) -> RestoreChoice:
    """The step and tier every rank restores from (the same answer on every rank).

    A memory step wins when it is at least as new as the newest committed storage step: storage
    is read only when no memory copy is complete on every rank.
    """
    newest_storage = max(storage_steps, default=None)
    loadable = [set(rank.own) | set(rank.peer) for rank in holdings]
    common = set.intersection(*loadable) if loadable else set()
    newest_memory = max(common, default=None)
    if newest_memory is None or (newest_storage is not None and newest_storage > newest_memory):
        return RestoreChoice(TIER_STORAGE, newest_storage)
    fetch = {
        rank: held.peer[newest_memory]
        for rank, held in enumerate(holdings)
        if newest_memory not in held.own
    }
    return RestoreChoice(TIER_MEMORY, newest_memory, fetch)
