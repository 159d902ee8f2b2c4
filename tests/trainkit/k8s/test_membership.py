"""DNS-informed membership of the k8s rendezvous: the pure rule and its edit of torch's state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    RendezvousSettings,
    RendezvousTimeout,
    _NodeDesc,
    _RendezvousState,
)

from trainkit.k8s.dns import Answer
from trainkit.k8s.membership import DnsMembership, decide_membership

SERVICE = "train.default.svc.cluster.local"
A, B, C = "10.0.0.10", "10.0.0.11", "10.0.0.12"


def decide(**overrides: frozenset[str] | str) -> object:
    fields: dict[str, frozenset[str] | str] = dict(
        live=frozenset({A, B, C}),
        seen=frozenset({A, B, C}),
        known_dead=frozenset(),
        joined=frozenset(),
        listed=frozenset(),
        own=A,
    )
    fields.update(overrides)
    return decide_membership(**fields)  # type: ignore[arg-type]


def test_a_pod_that_left_dns_is_evicted_but_one_never_seen_is_not() -> None:
    gone = decide(live=frozenset({A, B}), listed=frozenset({A, B, C}))
    assert gone.evict == {C}
    late = decide(live=frozenset({A, B}), seen=frozenset({A, B}), listed=frozenset({A, B, C}))
    assert late.evict == frozenset()  # not yet published: it may be about to appear
    own = decide(live=frozenset({B}), listed=frozenset({A, B}))
    assert own.evict == frozenset()  # this pod never evicts itself


def test_round_closes_only_when_every_live_pod_not_known_dead_joined() -> None:
    assert not decide(joined=frozenset({A, B})).close  # C is live and may still join
    assert decide(joined=frozenset({A, B, C})).close
    assert decide(
        joined=frozenset({A, B}), known_dead=frozenset({C})
    ).close  # cut off: heartbeats expired
    assert not decide(joined=frozenset()).close
    # a pod known dead that shows up again in the state is expected again
    assert not decide(
        joined=frozenset({A, B}), known_dead=frozenset({C}), listed=frozenset({A, B, C})
    ).close


class Table:
    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        self.queries = 0

    def query(self, name: str, rdtype: str) -> Answer:
        self.queries += 1
        if rdtype == "A" and name == SERVICE and self.addresses:
            return Answer(name, rdtype, "ok", self.addresses)
        return Answer(name, rdtype, "NXDOMAIN")


def settings(min_nodes: int = 2, max_nodes: int = 3) -> RendezvousSettings:
    return RendezvousSettings(
        "story", min_nodes, max_nodes, RendezvousTimeout(), timedelta(seconds=5), 3
    )


def test_state_edit_drops_the_gone_pod_and_advances_the_finished_round() -> None:
    resolver = Table((A, B, C))
    now = [0.0]
    membership = DnsMembership(
        service=SERVICE, own_address=A, resolver=resolver, clock=lambda: now[0]
    )
    state = _RendezvousState()
    dead = _NodeDesc(C, 1, 0)
    state.participants = {dead: 0}  # the survivors already left the finished round
    state.last_heartbeats = {dead: datetime.now(UTC)}
    state.complete = True
    membership.apply(state, settings(), ())
    assert state.participants == {dead: 0}  # still in DNS: nothing decided
    resolver.addresses = (A, B)
    now[0] += 1.0  # past the cache
    membership.apply(state, settings(), ())
    assert state.participants == {} and dead not in state.last_heartbeats
    assert not state.complete and state.round == 1  # torch's epilogue: the next round may form


def test_state_edit_closes_the_round_when_every_live_pod_joined() -> None:
    resolver = Table((A, B))
    membership = DnsMembership(service=SERVICE, own_address=A, resolver=resolver)
    state = _RendezvousState()
    state.participants = {_NodeDesc(A, 1, 0): 0}
    state.deadline = datetime.now(UTC) + timedelta(seconds=30)  # torch's last call
    membership.apply(state, settings(), ())
    assert state.deadline > datetime.now(UTC)  # B is live and has not joined
    state.participants[_NodeDesc(B, 1, 0)] = 0
    membership.cache_s = 0
    membership.apply(state, settings(), ())
    assert state.deadline <= datetime.now(UTC)  # torch's join op completes the round now


def test_dns_failure_decides_nothing() -> None:
    class Broken:
        def query(self, name: str, rdtype: str) -> Answer:
            return Answer(name, rdtype, "TIMEOUT")

    membership = DnsMembership(service=SERVICE, own_address=A, resolver=Broken())
    state = _RendezvousState()
    node = _NodeDesc(B, 1, 0)
    state.participants = {node: 0}
    membership.seen = {B}
    membership.apply(state, settings(), ())
    assert node in state.participants


def test_gone_names_round_pods_that_left_dns_never_unseen_ones_or_on_a_dns_failure() -> None:
    resolver = Table((A, B, C))
    membership = DnsMembership(service=SERVICE, own_address=A, resolver=resolver, cache_s=0)
    assert membership.gone({A, B, C}) == frozenset()
    resolver.addresses = (A, B)
    assert membership.gone({A, B, C}) == {C}
    assert membership.gone({A, B, "10.0.0.99"}) == frozenset()  # never in DNS: may be late
    resolver.addresses = ()
    assert membership.gone({A, B, C}) == frozenset()  # an empty Service is an outage, no verdict
