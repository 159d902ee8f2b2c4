"""What DNS says about which pods exist, applied to torch's dynamic rendezvous state.

A deleted pod's record leaves the headless Service: its node is dropped from the rendezvous at
once instead of after torch's keep-alive expiry (and the pods of its round restart their workers), and a round closes as soon as every live pod has
joined instead of waiting out ``last_call_timeout``. It never adds nodes, never ranks them and
never writes the shared state itself: torch's own operations do, from the view this module edits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from trainkit.k8s.dns import Resolver

__all__ = ["DnsMembership", "MembershipDecision", "decide_membership", "install_dns_membership"]

logger = logging.getLogger("trainkit.k8s.membership")


@dataclass(frozen=True)
class MembershipDecision:
    """``evict``: addresses whose nodes leave the rendezvous; ``close``: the round may close now."""

    evict: frozenset[str]
    close: bool
    expected: frozenset[str]


def decide_membership(
    *,
    live: frozenset[str],
    seen: frozenset[str],
    known_dead: frozenset[str],
    joined: frozenset[str],
    listed: frozenset[str],
    own: str,
) -> MembershipDecision:
    """Pure rule, from addresses: ``live`` (in DNS now), ``seen`` (ever in DNS), ``known_dead``
    (heartbeats expired), ``joined`` (participants of the open round), ``listed`` (every node in
    the state, waiting ones included) and ``own`` (this pod).

    A node is evicted when its pod was in DNS before and is not now (a pod that was never seen may
    just be late to publish). The round may close when every live pod not known dead has joined.
    """
    evict = frozenset(addr for addr in listed if addr in seen and addr not in live and addr != own)
    expected = live - (known_dead - listed)
    return MembershipDecision(
        evict=evict, close=bool(joined) and expected <= (joined - evict), expected=expected
    )


@dataclass
class DnsMembership:
    """The live addresses of ``service`` (cached ``cache_s``), what was ever seen, what died."""

    service: str
    own_address: str
    resolver: Resolver
    families: tuple[str, ...] = ("A", "AAAA")
    cache_s: float = 0.5
    clock: Callable[[], float] = time.monotonic
    seen: set[str] = field(default_factory=set)
    known_dead: set[str] = field(default_factory=set)
    _cached: tuple[float, frozenset[str] | None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def live_addresses(self) -> frozenset[str] | None:
        """Addresses in DNS now, or None when a lookup failed (nothing is decided on a failure)."""
        now = self.clock()
        if self._cached is not None and now - self._cached[0] < self.cache_s:
            return self._cached[1]
        found: set[str] | None = set()
        for rdtype in self.families:
            answer = self.resolver.query(self.service, rdtype)
            if answer.status == "ok":
                found.update(answer.values)  # type: ignore[union-attr]
            elif answer.status not in {"NXDOMAIN", "NODATA"}:
                found = None  # timeout or server failure: no evidence either way
                break
        live = (
            frozenset(found) if found else None
        )  # an empty Service is a DNS outage, not a verdict
        self._cached = (now, live)
        return live

    def gone(self, addresses: Iterable[str]) -> frozenset[str]:
        """Those of ``addresses`` that were in DNS and are not now (empty when a lookup failed)."""
        with self._lock:
            live = self.live_addresses()
            if live is None:
                return frozenset()
            self.seen |= live
            return frozenset(addr for addr in addresses if addr in self.seen and addr not in live)

    def apply(self, state: Any, settings: Any, dead_nodes: Iterable[Any]) -> None:
        """Edit torch's ``_RendezvousState`` in place after a sync (see ``install_dns_membership``)."""
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
            _remove_participant_epilogue,
        )

        with self._lock:
            self.known_dead.update(node.addr for node in dead_nodes)
            live = self.live_addresses()
            if live is None:
                return
            self.seen |= live
            nodes = set(state.last_heartbeats) | set(state.participants) | set(state.wait_list)
            decision = decide_membership(
                live=live,
                seen=frozenset(self.seen),
                known_dead=frozenset(self.known_dead),
                joined=frozenset(node.addr for node in state.participants),
                listed=frozenset(node.addr for node in nodes),
                own=self.own_address,
            )
            removed_participant = False
            for node in nodes:
                if node.addr not in decision.evict:
                    continue
                logger.info("k8s rendezvous: pod %s left %s: node removed", node.addr, self.service)
                state.last_heartbeats.pop(node, None)
                state.wait_list.discard(node)
                state.redundancy_list.discard(node)
                removed_participant |= state.participants.pop(node, None) is not None
                self.known_dead.add(node.addr)
            if removed_participant:
                _remove_participant_epilogue(state, settings)
            due = state.deadline is not None and state.deadline > datetime.now(UTC)
            if (
                decision.close
                and due
                and not state.complete
                and settings.min_nodes <= len(state.participants) <= settings.max_nodes
            ):
                logger.info(
                    "k8s rendezvous: all %d live pod(s) of %s joined: closing the round now",
                    len(decision.expected),
                    self.service,
                )
                state.deadline = datetime.now(UTC) - timedelta(microseconds=1)


def install_dns_membership(inner: object, membership: DnsMembership) -> bool:
    """Hook ``membership`` into a torch ``DynamicRendezvousHandler``'s state syncs.

    Returns False (and torch's timeouts alone decide) when this torch lays the handler out
    differently.
    """
    holder = getattr(inner, "_state_holder", None)
    settings = getattr(inner, "_settings", None)
    if holder is None or settings is None or not hasattr(holder, "sync"):
        logger.warning(
            "k8s rendezvous: this torch's dynamic rendezvous has no state holder to watch; rounds "
            "close on last_call_timeout and lost pods leave after the keep-alive timeout"
        )
        return False
    original_sync = holder.sync

    def sync() -> bool | None:
        has_set = original_sync()
        membership.apply(holder.state, settings, getattr(holder, "_dead_nodes", ()))
        return has_set

    holder.sync = sync
    return True
