"""The ``k8s`` rendezvous backend for torch.distributed.elastic: peers found through a headless Service.

Membership, heartbeats and rounds are torch's dynamic (c10d) rendezvous; this module decides where
its store lives (found through DNS), binds it to the pod IP, signs its state with the job token
(``trainkit.k8s.signed_state``) and orders node ranks by pod ordinal. It never runs a scheduler or
supervises processes; torchrun loads it through the ``torchrun.handlers`` entry point.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from trainkit.env_vars import DEFAULT_RDZV_PORT
from trainkit.k8s.bound_store import listening_tcp_store
from trainkit.k8s.dns import (
    DiscoveryError,
    Resolver,
    _Attempts,
    _backoff,
    default_resolver,
    format_host_port,
    wait_for_name,
)
from trainkit.k8s.identity import PodIdentity, read_pod_identity, service_fqdn
from trainkit.k8s.membership import DnsMembership, install_dns_membership

if TYPE_CHECKING:
    from torch.distributed import Store
    from torch.distributed.elastic.rendezvous import (
        RendezvousHandler,
        RendezvousInfo,
        RendezvousParameters,
    )

__all__ = [
    "DEFAULT_PORT",
    "K8sRendezvousConfig",
    "RendezvousConfigError",
    "create_k8s_handler",
    "handler_factory",
    "locate_store",
    "order_by_ordinal",
    "wrap_dynamic_handler",
]

logger = logging.getLogger("trainkit.k8s.rendezvous")

#: torch's c10d rendezvous default port, so ``--rdzv-endpoint svc`` means the same port as with c10d.
DEFAULT_PORT = DEFAULT_RDZV_PORT

_KEY_PREFIX = "trainkit.k8s/"


class RendezvousConfigError(ValueError):
    """The ``k8s`` rendezvous cannot start as configured (flags, pod identity, job token); the
    message names what and the fix. trainkit-run reports it in one line and exits 2."""


_DISABLE_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True, kw_only=True)
class K8sRendezvousConfig:
    """Options of the ``k8s`` backend, from ``--rdzv-endpoint`` and ``--rdzv-conf``.

    ``service``: FQDN of the training pods' headless Service (endpoint host, default the pod's
    subdomain); ``port``: store port (endpoint port, default 29400); ``store_service``: FQDN of a
    separate ``trainkit rdzv-store`` pod's Service (``store_service=`` in rdzv-conf, default none:
    a training pod hosts the store); ``ip_family``: ``auto``/``ipv4``/``ipv6``; ``dns_timeout_s``:
    how long to wait for records (``dns_timeout``, default ``join_timeout``, default 600);
    ``store_grace_s``: elastic worlds skip a lower ordinal whose store does not answer for this long
    (``store_grace``, default 10); ``read_timeout_s``: store operation timeout (``read_timeout``, 60);
    ``dns_membership``: elastic worlds drop pods that left DNS at once and close a round when every
    live pod joined (``dns_membership``, default 1; 0 leaves it to torch's timeouts alone).
    """

    service: str
    port: int = DEFAULT_PORT
    store_service: str | None = None
    ip_family: str = "auto"
    dns_timeout_s: float = 600.0
    store_grace_s: float = 10.0
    read_timeout_s: float = 60.0
    dns_membership: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"k8s rendezvous: port {self.port} must be in 1..65535")
        if self.ip_family not in {"auto", "ipv4", "ipv6"}:
            raise ValueError(
                f"k8s rendezvous: ip_family={self.ip_family!r}; expected auto, ipv4 or ipv6"
            )
        for name in ("dns_timeout_s", "store_grace_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"k8s rendezvous: {name} ({getattr(self, name)}) must be positive")

    @classmethod
    def from_params(
        cls, params: RendezvousParameters, identity: PodIdentity
    ) -> K8sRendezvousConfig:
        from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

        endpoint = (params.endpoint or "").strip() or (identity.subdomain or "")
        if not endpoint:
            raise ValueError(
                "k8s rendezvous: no headless Service: pass --rdzv-endpoint <service>[:port] or set the "
                "pod's spec.subdomain (StatefulSet: serviceName) to the Service name"
            )
        host, port = parse_rendezvous_endpoint(endpoint, DEFAULT_PORT)
        store_service = params.get("store_service")
        return cls(
            service=service_fqdn(host, identity.namespace, identity.cluster_domain),
            port=port,
            store_service=(
                service_fqdn(store_service, identity.namespace, identity.cluster_domain)
                if store_service
                else None
            ),
            ip_family=str(params.get("ip_family", "auto")).lower(),
            dns_timeout_s=float(params.get("dns_timeout", params.get("join_timeout", 600))),
            store_grace_s=float(params.get("store_grace", 10)),
            read_timeout_s=float(params.get("read_timeout", 60)),
            dns_membership=_flag(params.get("dns_membership", "1"), "dns_membership"),
        )


def _flag(value: object, name: str) -> bool:
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"k8s rendezvous: {name}={value!r} in --rdzv-conf; expected 1 or 0")


def _accepts(address: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def locate_store(
    identity: PodIdentity,
    config: K8sRendezvousConfig,
    *,
    static: bool,
    pod_ip: str,
    resolver: Resolver | None = None,
    accepts: Callable[[str, int], bool] = _accepts,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, bool]:
    """(store address, whether this pod hosts it).

    Separate store pod: its Service's address. Static world: ordinal 0 hosts, the others wait for
    its DNS name. Elastic world: a store already answering behind the Service wins; otherwise the
    lowest ordinal in DNS hosts, a lower ordinal that never answers being skipped after
    ``store_grace_s``.
    """
    resolver = resolver or default_resolver()
    if config.store_service is not None:
        addresses = wait_for_name(
            config.store_service,
            service=config.store_service,
            timeout_s=config.dns_timeout_s,
            purpose="--rdzv-conf store_service names the rendezvous store pod's Service",
            resolver=resolver,
            family=config.ip_family,
            sleep=sleep,
            clock=clock,
        )
        return addresses[0], False
    ordinal = _require_ordinal(identity)
    if static:
        if ordinal == 0:
            return pod_ip, True
        addresses = wait_for_name(
            identity.peer_fqdn(0, config.service),
            service=config.service,
            timeout_s=config.dns_timeout_s,
            purpose="ordinal 0 hosts the rendezvous store of a static world (--nnodes N)",
            resolver=resolver,
            family=config.ip_family,
            sleep=sleep,
            clock=clock,
        )
        return addresses[0], False

    families = {"auto": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}[config.ip_family]
    attempts = _Attempts()
    first_seen: dict[int, float] = {}
    deadline = clock() + config.dns_timeout_s
    for delay in _backoff(maximum_s=0.5):
        members = [v for t in families for v in _values(attempts.ask(resolver, config.service, t))]
        for address in members:
            if address != pod_ip and accepts(address, config.port):
                return address, False
        now = clock()
        pending = []
        for lower in range(ordinal):
            name = identity.peer_fqdn(lower, config.service)
            if any(_values(attempts.ask(resolver, name, t)) for t in families):
                first_seen.setdefault(lower, now)
                if now - first_seen[lower] < config.store_grace_s:
                    pending.append(name)
        if not pending:
            return pod_ip, True
        if now + delay > deadline:
            raise DiscoveryError(
                f"k8s rendezvous: no store answered on port {config.port} behind {config.service} within "
                f"{config.dns_timeout_s:g} s, and lower ordinals {', '.join(pending)} are still in DNS; "
                "check that their launchers run, or lower store_grace in --rdzv-conf"
            )
        sleep(delay)
    raise AssertionError("unreachable")


def _values(answer: object) -> tuple[str, ...]:
    return answer.values if answer.status == "ok" else ()  # type: ignore[attr-defined]


def _require_ordinal(identity: PodIdentity) -> int:
    if identity.ordinal is None:
        raise ValueError(
            f"k8s rendezvous: pod {identity.hostname!r} has no ordinal: run it as a StatefulSet, indexed "
            "Job or JobSet pod (hostname <name>-<n>), set JOB_COMPLETION_INDEX, or use the c10d backend"
        )
    return identity.ordinal


def own_address(identity: PodIdentity, family: str = "auto") -> str:
    """The pod IP to advertise: POD_IP / /etc/hosts, else the source address towards the nameserver."""
    if identity.pod_ip is not None:
        return identity.pod_ip
    nameserver = "10.0.0.10"  # no packet is sent: connect() on UDP only picks a route
    try:
        with open("/etc/resolv.conf") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    nameserver = fields[1]
                    break
    except OSError:
        pass
    af = socket.AF_INET6 if ":" in nameserver or family == "ipv6" else socket.AF_INET
    with socket.socket(af, socket.SOCK_DGRAM) as probe:
        probe.connect((nameserver, 53))
        return probe.getsockname()[0]


def order_by_ordinal(
    entries: list[dict[str, object]], *, static_num_nodes: int | None
) -> list[int]:
    """Node ranks by pod ordinal: ``result[i]`` is the node rank of the entry at torch's rank ``i``.

    In a static world the ordinals must be exactly ``0..N-1`` so that node rank = ordinal, always.
    """

    def key(i: int) -> tuple[bool, int, str, int]:
        ordinal = entries[i]["ordinal"]  # None only with a store pod: such pods sort last, by name
        return (ordinal is None, int(ordinal or 0), str(entries[i]["hostname"]), i)  # type: ignore[call-overload]

    order = sorted(range(len(entries)), key=key)
    ranks = [0] * len(entries)
    for node_rank, index in enumerate(order):
        ranks[index] = node_rank
    if static_num_nodes is not None:
        ordinals = sorted(int(e["ordinal"]) for e in entries if e["ordinal"] is not None)  # type: ignore[call-overload]
        ordinals += [-1] * (len(entries) - len(ordinals))  # pods without an ordinal never fit
        if ordinals != list(range(static_num_nodes)):
            shown = ", ".join(
                f"{e['hostname']}={e['ordinal']}" for e in (entries[i] for i in order)
            )
            raise ValueError(
                f"k8s rendezvous: a static world of {static_num_nodes} nodes needs pod ordinals "
                f"0..{static_num_nodes - 1} exactly once, got {shown}; fix --nnodes or the replica count"
            )
    return ranks


def _make_handler_class() -> type:
    from torch.distributed import PrefixStore
    from torch.distributed.elastic.rendezvous import (
        RendezvousHandler,
        RendezvousInfo,
        RendezvousStoreInfo,
    )

    class K8sRendezvousHandler(RendezvousHandler):
        """torch's dynamic rendezvous, with node ranks ordered by pod ordinal and a per-round bootstrap store."""

        def __init__(
            self,
            inner: RendezvousHandler,
            *,
            identity: PodIdentity,
            pod_ip: str,
            static_num_nodes: int | None,
            store: Store,
            backend_name: str,
            membership: DnsMembership | None = None,
        ) -> None:
            self._inner = inner
            self._membership = membership
            self._round_addrs: frozenset[str] = frozenset()  # the pods of this node's round
            self._backend_name = backend_name
            self._identity = identity
            self._pod_ip = pod_ip
            self._static_num_nodes = static_num_nodes
            self._store = store  # keeps the rendezvous store (or the connection to it) alive
            self._bootstrap_server: Store | None = None

        def get_backend(self) -> str:
            return self._backend_name

        @property
        def use_agent_store(self) -> bool:
            return True

        def next_rendezvous(self) -> RendezvousInfo:
            # torch's shared-store path leaves a node that joins a later round waiting forever for
            # MASTER_ADDR (only a node that was never rank 0 before publishes it); this handler
            # serves the workers' store itself, so the inner handler runs with sharing disabled.
            started = time.monotonic()
            self._round_addrs = frozenset()
            logger.info(
                "%s rendezvous: pod %s joining", self._backend_name, self._identity.hostname
            )
            previous = os.environ.get(_DISABLE_SHARED_STORE)
            os.environ[_DISABLE_SHARED_STORE] = "1"
            try:
                info = self._inner.next_rendezvous()
            finally:
                if previous is None:
                    os.environ.pop(_DISABLE_SHARED_STORE, None)
                else:
                    os.environ[_DISABLE_SHARED_STORE] = previous
            # The inner store is already scoped to this round, so these keys never mix rounds.
            store = PrefixStore(_KEY_PREFIX, info.store)
            me = {
                "ordinal": self._identity.ordinal,
                "hostname": self._identity.hostname,
                "addr": self._pod_ip,
            }
            store.set(f"node/{info.rank}", json.dumps(me))
            keys = [f"node/{i}" for i in range(info.world_size)]
            store.wait(keys)
            entries = [json.loads(value) for value in store.multi_get(keys)]
            try:
                rank = order_by_ordinal(entries, static_num_nodes=self._static_num_nodes)[info.rank]
            except ValueError as error:
                from torch.distributed.elastic.rendezvous import RendezvousStateError

                raise RendezvousStateError(str(error)) from None
            if rank == 0:
                # Workers expect a fresh store each round (torch adds no per-attempt key prefix), so
                # stale keys of the previous round's workers can never be read.
                # Listening on the pod IP only: torch's own store would bind every address.
                self._bootstrap_server = listening_tcp_store(self._pod_ip, 0)
                store.set("bootstrap", json.dumps([self._pod_ip, self._bootstrap_server.port]))
            master_addr, master_port = json.loads(store.get("bootstrap"))
            self._round_addrs = frozenset(entry["addr"] for entry in entries)
            logger.info(
                "%s rendezvous: pod %s (ordinal %s) is node %d of %d; workers' store %s; round took "
                "%.2f s",
                self._backend_name,
                self._identity.hostname,
                self._identity.ordinal,
                rank,
                info.world_size,
                format_host_port(master_addr, master_port),
                time.monotonic() - started,
            )
            return RendezvousInfo(
                info.store, rank, info.world_size, RendezvousStoreInfo(master_addr, master_port)
            )

        def is_closed(self) -> bool:
            return self._inner.is_closed()

        def set_closed(self) -> None:
            self._inner.set_closed()

        def num_nodes_waiting(self) -> int:
            # torch's agent asks this every monitor interval while its workers look healthy; a
            # pod of this round that left DNS counts too, so survivors whose workers sit blocked
            # on it restart now instead of when a collective times out or a peer re-joins.
            waiting = self._inner.num_nodes_waiting()
            if waiting:
                return waiting
            lost = self.lost_peers()
            if lost:
                logger.warning(
                    "%s rendezvous: pod(s) %s of this round left DNS: restarting the workers",
                    self._backend_name,
                    ", ".join(sorted(lost)),
                )
            return len(lost)

        def lost_peers(self) -> frozenset[str]:
            """Addresses of this round's pods that have left DNS (empty without DNS membership)."""
            if self._membership is None:
                return frozenset()
            return self._membership.gone(self._round_addrs - {self._pod_ip})

        def get_run_id(self) -> str:
            return self._inner.get_run_id()

        def shutdown(self) -> bool:
            return self._inner.shutdown()

    return K8sRendezvousHandler


def wrap_dynamic_handler(
    params: RendezvousParameters,
    store: Store,
    *,
    key: bytes | None,
    identity: PodIdentity,
    advertise_addr: str,
    static_num_nodes: int | None,
    backend_name: str,
    membership: DnsMembership | None = None,
) -> RendezvousHandler:
    """torch's dynamic rendezvous on ``store``, its state signed with ``key`` (None: unsigned).

    Node ranks follow pod ordinals and node rank 0 serves each round's workers a fresh store that
    listens on ``advertise_addr`` only. With ``membership`` (elastic k8s worlds), pods that left
    DNS leave the rendezvous at once and a round closes when every live pod has joined.
    """
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    from trainkit.k8s.signed_state import SignedRendezvousBackend

    backend = C10dRendezvousBackend(store, params.run_id)
    if key is not None:
        backend = SignedRendezvousBackend(  # type: ignore[assignment]
            backend, key=key, store_key=f"torch.rendezvous.{params.run_id}"
        )
    params.local_addr = advertise_addr
    inner = create_handler(store, backend, params)
    if membership is not None:
        install_dns_membership(inner, membership)
    return _make_handler_class()(
        inner,
        identity=identity,
        pod_ip=advertise_addr,
        static_num_nodes=static_num_nodes,
        store=store,
        backend_name=backend_name,
        membership=membership,
    )


def create_k8s_handler(
    params: RendezvousParameters,
    *,
    identity: PodIdentity | None = None,
    resolver: Resolver | None = None,
    env: Mapping[str, str] | None = None,
) -> RendezvousHandler:
    """Build the ``k8s`` handler from torchrun's rendezvous parameters (see ``K8sRendezvousConfig``).

    Needs ``TRAINKIT_JOB_TOKEN`` in ``env`` (default ``os.environ``) unless
    ``TRAINKIT_RDZV_ALLOW_UNAUTHENTICATED=1``; the store this pod hosts listens on its pod IP only.
    A configuration it cannot start with raises ``RendezvousConfigError`` (a ``ValueError``).
    """
    try:
        return _create_k8s_handler(params, identity=identity, resolver=resolver, env=env)
    except RendezvousConfigError:
        raise
    except ValueError as error:
        raise RendezvousConfigError(str(error)) from error


def _create_k8s_handler(
    params: RendezvousParameters,
    *,
    identity: PodIdentity | None,
    resolver: Resolver | None,
    env: Mapping[str, str] | None,
) -> RendezvousHandler:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import (
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    from trainkit.k8s.signed_state import require_job_token

    env = os.environ if env is None else env
    identity = identity or read_pod_identity()
    config = K8sRendezvousConfig.from_params(params, identity)
    max_attempts = params.get_as_int("keep_alive_max_attempt", 3)
    if max_attempts is not None and max_attempts < 3:
        # torch sends a heartbeat only when the last one is a full interval old, so one arrives up
        # to ~2 intervals apart; with fewer attempts live nodes are dropped as dead.
        raise ValueError(
            f"k8s rendezvous: keep_alive_max_attempt={max_attempts} would drop live nodes as dead; "
            "use 3 or more (lower keep_alive_interval instead to detect lost pods sooner)"
        )
    static = params.min_nodes == params.max_nodes
    if static and config.store_service is None:
        ordinal = _require_ordinal(identity)
        if ordinal >= params.max_nodes:
            raise ValueError(
                f"k8s rendezvous: pod {identity.hostname!r} has ordinal {ordinal} but --nnodes is "
                f"{params.max_nodes}; a static world needs ordinals 0..{params.max_nodes - 1} (raise "
                "--nnodes or use MIN:MAX for an elastic world)"
            )
    key = require_job_token(env)
    pod_ip = params.local_addr or own_address(identity, config.ip_family)
    started = time.monotonic()
    try:
        host, is_host = locate_store(
            identity, config, static=static, pod_ip=pod_ip, resolver=resolver
        )
    except DiscoveryError as error:
        raise RendezvousTimeoutError(str(error)) from error
    logger.info(
        "k8s rendezvous: store %s (%s) found in %.2f s",
        format_host_port(host, config.port),
        "hosted here" if is_host else "remote",
        time.monotonic() - started,
    )
    timeout = timedelta(seconds=config.read_timeout_s)
    try:
        if is_host:
            store = listening_tcp_store(host, config.port, timeout=timeout)
        else:
            store = TCPStore(host, config.port, multi_tenant=True, timeout=timeout)
    except (OSError, RuntimeError, ValueError, TimeoutError) as error:
        raise RendezvousConnectionError(
            f"k8s rendezvous: cannot {'listen on' if is_host else 'connect to'} the store at "
            f"{format_host_port(host, config.port)}: {error}; check the port is free and not blocked by a "
            "NetworkPolicy"
        ) from error
    return wrap_dynamic_handler(
        params,
        store,
        key=key,
        identity=identity,
        advertise_addr=pod_ip,
        static_num_nodes=params.max_nodes if static else None,
        backend_name="k8s",
        membership=None
        if static or not config.dns_membership
        else DnsMembership(
            service=config.service,
            own_address=pod_ip,
            resolver=resolver or default_resolver(),
            families={"auto": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}[config.ip_family],
        ),
    )


def handler_factory() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """Entry point ``torchrun.handlers: k8s``: torch calls this with no arguments and registers the result."""
    return create_k8s_handler
