"""The k8s rendezvous decisions in one process: store location, rank order, options, registration."""

from __future__ import annotations

import base64
import socket
from datetime import timedelta

import pytest
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters

from trainkit.k8s.dns import Answer, DiscoveryError, DiscoveryTimeoutError
from trainkit.k8s.identity import PodIdentity
from trainkit.k8s.rendezvous import (
    K8sRendezvousConfig,
    create_k8s_handler,
    handler_factory,
    locate_store,
    order_by_ordinal,
)

SERVICE = "train.default.svc.cluster.local"
TOKEN_ENV = {"TRAINKIT_JOB_TOKEN": "0123456789abcdef0123"}


def pod(number: int, **overrides: object) -> PodIdentity:
    ordinal = number
    fields = dict(
        hostname=f"w-{ordinal}",
        subdomain="train",
        namespace="default",
        cluster_domain="cluster.local",
        pod_name=f"w-{ordinal}",
        pod_ip=f"10.0.0.{ordinal + 10}",
        workload="statefulset",
        ordinal=ordinal,
        name_prefix="w",
        in_kubernetes=True,
    )
    fields.update(overrides)
    return PodIdentity(**fields)  # type: ignore[arg-type]


class TableResolver:
    def __init__(self, table: dict[str, tuple[str, ...]]) -> None:
        self.table = table

    def query(self, name: str, rdtype: str) -> Answer:
        values = tuple(v for v in self.table.get(name, ()) if (":" in v) == (rdtype == "AAAA"))
        return Answer(name, rdtype, "ok", values) if values else Answer(name, rdtype, "NXDOMAIN")


def fake_time() -> tuple[list[float], object, object]:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    return now, sleep, lambda: now[0]


def config(**overrides: object) -> K8sRendezvousConfig:
    return K8sRendezvousConfig(service=SERVICE, dns_timeout_s=30, store_grace_s=3, **overrides)  # type: ignore[arg-type]


def test_node_ranks_follow_ordinals_numerically() -> None:
    entries = [
        {"ordinal": o, "hostname": f"w-{o}"} for o in (10, 2, 0)
    ]  # torch's order: by address string
    assert order_by_ordinal(entries, static_num_nodes=None) == [2, 1, 0]


def test_static_world_needs_exactly_ordinals_0_to_n_minus_1() -> None:
    entries = [{"ordinal": o, "hostname": f"w-{o}"} for o in (0, 1, 1)]
    with pytest.raises(ValueError, match=r"ordinals 0\.\.2 exactly once, got w-0=0, w-1=1, w-1=1"):
        order_by_ordinal(entries, static_num_nodes=3)


def test_static_world_rejects_pods_without_ordinal() -> None:
    entries = [{"ordinal": 0, "hostname": "w-0"}, {"ordinal": None, "hostname": "runner"}]
    with pytest.raises(ValueError, match="w-0=0, runner=None"):
        order_by_ordinal(entries, static_num_nodes=2)
    assert order_by_ordinal(entries, static_num_nodes=None) == [0, 1]


def test_static_store_is_ordinal_0_found_through_dns() -> None:
    _now, sleep, clock = fake_time()
    resolver = TableResolver({f"w-0.{SERVICE}": ("10.0.0.10",)})
    assert locate_store(pod(0), config(), static=True, pod_ip="10.0.0.10", resolver=resolver) == (
        "10.0.0.10",
        True,
    )
    found = locate_store(
        pod(2),
        config(),
        static=True,
        pod_ip="10.0.0.12",
        resolver=resolver,
        sleep=sleep,
        clock=clock,
    )
    assert found == ("10.0.0.10", False)


def test_static_store_missing_times_out_with_the_dns_story() -> None:
    now, sleep, clock = fake_time()
    with pytest.raises(DiscoveryTimeoutError, match=f"w-0.{SERVICE} not found in DNS within 30 s"):
        locate_store(
            pod(1),
            config(),
            static=True,
            pod_ip="10.0.0.11",
            resolver=TableResolver({}),
            sleep=sleep,
            clock=clock,
        )
    assert now[0] <= 30


def test_elastic_joins_a_store_already_answering_behind_the_service() -> None:
    resolver = TableResolver({SERVICE: ("10.0.0.11", "10.0.0.13")})
    accepting = {"10.0.0.11"}
    found = locate_store(
        pod(0),
        config(),
        static=False,
        pod_ip="10.0.0.10",
        resolver=resolver,
        accepts=lambda address, port: address in accepting,
    )
    assert found == (
        "10.0.0.11",
        False,
    )  # ordinal 0 came back late: it must not start a second store


def test_elastic_lowest_ordinal_hosts_and_dead_lower_ordinals_are_skipped_after_grace() -> None:
    now, sleep, clock = fake_time()
    resolver = TableResolver(
        {SERVICE: ("10.0.0.10", "10.0.0.12"), f"w-0.{SERVICE}": ("10.0.0.10",)}
    )
    found = locate_store(
        pod(2),
        config(),
        static=False,
        pod_ip="10.0.0.12",
        resolver=resolver,
        accepts=lambda address, port: False,
        sleep=sleep,
        clock=clock,
    )
    assert found == ("10.0.0.12", True)
    assert 3.0 <= now[0] < 5.0  # waited out store_grace for w-0, then took over


def test_elastic_without_lower_ordinals_in_dns_hosts_immediately() -> None:
    found = locate_store(
        pod(3),
        config(),
        static=False,
        pod_ip="10.0.0.13",
        resolver=TableResolver({}),
        accepts=lambda address, port: False,
    )
    assert found == ("10.0.0.13", True)


def test_store_pod_service_is_used_when_configured() -> None:
    resolver = TableResolver({"rdzv-store.default.svc.cluster.local": ("fd00::5",)})
    found = locate_store(
        pod(0),
        config(store_service="rdzv-store.default.svc.cluster.local"),
        static=False,
        pod_ip="fd00::10",
        resolver=resolver,
    )
    assert found == ("fd00::5", False)


def params(
    endpoint: str, nnodes: tuple[int, int], run_id: str = "job", **conf: object
) -> RendezvousParameters:
    return RendezvousParameters("k8s", endpoint, run_id, nnodes[0], nnodes[1], **conf)


def test_config_from_endpoint_and_rdzv_conf() -> None:
    cfg = K8sRendezvousConfig.from_params(
        params("train:1234", (2, 4), store_service="st", ip_family="IPv6", join_timeout=7), pod(0)
    )
    assert (cfg.service, cfg.port, cfg.store_service, cfg.ip_family, cfg.dns_timeout_s) == (
        SERVICE,
        1234,
        "st.default.svc.cluster.local",
        "ipv6",
        7.0,
    )
    assert (
        K8sRendezvousConfig.from_params(params("", (1, 1)), pod(0)).service == SERVICE
    )  # subdomain
    with pytest.raises(ValueError, match="ip_family='ipv5'"):
        K8sRendezvousConfig.from_params(params("train", (1, 1), ip_family="ipv5"), pod(0))
    with pytest.raises(ValueError, match="no headless Service"):
        K8sRendezvousConfig.from_params(params("", (1, 1)), pod(0, subdomain=None))


def test_handler_rejects_ordinal_outside_static_world_and_fragile_heartbeats() -> None:
    with pytest.raises(ValueError, match="ordinal 10 but --nnodes is 3"):
        create_k8s_handler(params("train", (3, 3)), identity=pod(10), resolver=TableResolver({}))
    with pytest.raises(ValueError, match="keep_alive_max_attempt=2"):
        create_k8s_handler(params("train", (1, 3), keep_alive_max_attempt=2), identity=pod(0))
    with pytest.raises(ValueError, match="has no ordinal"):
        create_k8s_handler(
            params("train", (2, 2)), identity=pod(0, hostname="runner", ordinal=None, workload=None)
        )


def test_entry_point_returns_the_creator_torch_registers() -> None:
    from importlib.metadata import entry_points

    (entry,) = [ep for ep in entry_points(group="torchrun.handlers") if ep.name == "k8s"]
    creator = entry.load()()
    assert creator is create_k8s_handler is handler_factory()


def test_discovery_errors_are_rendezvous_timeouts() -> None:
    from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

    with pytest.raises(RendezvousTimeoutError, match="not found in DNS within 1 s"):
        create_k8s_handler(
            params("train", (2, 2), join_timeout=1),
            identity=pod(1),
            resolver=TableResolver({}),
            env=TOKEN_ENV,
        )
    assert issubclass(DiscoveryTimeoutError, DiscoveryError)


def test_handler_needs_a_job_token_before_any_discovery() -> None:
    with pytest.raises(ValueError, match="TRAINKIT_JOB_TOKEN is not set"):
        create_k8s_handler(params("train", (2, 2)), identity=pod(1), env={})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_world_of_one_forms_on_stores_bound_to_the_pod_ip_with_signed_state() -> None:
    # 127.0.0.2 is this machine too: a store listening on every address would accept there.
    port = free_port()
    handler = create_k8s_handler(
        params(f"train:{port}", (1, 1), run_id="signed1", join_timeout=30),
        identity=pod(0, pod_ip="127.0.0.1"),
        resolver=TableResolver({}),
        env=TOKEN_ENV,
    )
    try:
        assert refused("127.0.0.2", port) and not refused("127.0.0.1", port)
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        workers_port = info.bootstrap_store_info.master_port
        assert info.bootstrap_store_info.master_addr == "127.0.0.1"
        assert refused("127.0.0.2", workers_port) and not refused("127.0.0.1", workers_port)
        raw = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        assert base64.b64decode(raw.get("torch.rendezvous.signed1")).startswith(b"TKRS1")
    finally:
        handler.shutdown()
