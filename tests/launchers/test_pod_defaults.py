"""trainkit-run's pod defaults: the k8s rendezvous inside a pod, explicit flags always win."""

from __future__ import annotations

import argparse

import pytest
from torch.distributed.run import get_args_parser

from launchers.pod_defaults import apply_pod_defaults

POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_IP": "10.4.0.7", "TRAINKIT_SERVICE": "train"}


def parse(argv: list[str]) -> argparse.Namespace:
    return get_args_parser().parse_args([*argv, "train.py"])


def test_inside_a_pod_uses_the_k8s_backend_with_node_count_from_env() -> None:
    args = parse([])
    notes = apply_pod_defaults(
        args, set(), {**POD, "TRAINKIT_NNODES": "2:4", "TRAINKIT_RDZV_STORE": "rdzv-store"}
    )
    assert (args.rdzv_backend, args.rdzv_endpoint, args.nnodes, args.local_addr) == (
        "k8s",
        "train:29400",
        "2:4",
        "10.4.0.7",
    )
    assert args.rdzv_conf == "store_service=rdzv-store"
    assert any("TRAINKIT_SERVICE" in note for note in notes) and any(
        "TRAINKIT_NNODES" in n for n in notes
    )


def test_service_flag_wins_over_env_and_port_from_env() -> None:
    args = parse([])
    args.service = "jobsvc"
    apply_pod_defaults(args, set(), {**POD, "TRAINKIT_NNODES": "2", "TRAINKIT_RDZV_PORT": "29500"})
    assert args.rdzv_endpoint == "jobsvc:29500"


def test_subdomain_is_the_service_when_nothing_else_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import launchers.pod_defaults as pod_defaults
    from trainkit.k8s.identity import PodIdentity

    identity = PodIdentity(
        hostname="w-1",
        subdomain="mysvc",
        namespace="ml",
        cluster_domain="cluster.local",
        pod_name=None,
        pod_ip=None,
        workload="statefulset",
        ordinal=1,
        name_prefix="w",
    )
    monkeypatch.setattr(pod_defaults, "read_pod_identity", lambda env: identity)
    args = parse([])
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "TRAINKIT_NNODES": "2"}
    notes = apply_pod_defaults(args, set(), in_pod)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.nnodes) == ("k8s", "mysvc:29400", "2")
    assert "subdomain" in notes[0] and "TRAINKIT_NNODES" in notes[1]
    monkeypatch.setattr(
        pod_defaults,
        "read_pod_identity",
        lambda env: PodIdentity(**{**identity.__dict__, "subdomain": None}),
    )
    args = parse([])
    assert "no headless Service" in apply_pod_defaults(args, set(), in_pod)[0]
    assert args.rdzv_backend == "static"


def test_outside_a_pod_nothing_changes() -> None:
    args = parse([])
    before = vars(args).copy()
    assert (
        apply_pod_defaults(args, set(), {"TRAINKIT_SERVICE": "train", "TRAINKIT_NNODES": "3"}) == []
    )
    assert vars(args) == before


@pytest.mark.parametrize(
    "flag",
    [
        ["--rdzv-backend", "c10d"],
        ["--rdzv-endpoint", "x:1"],
        ["--standalone"],
        ["--master-addr", "a"],
        ["--node-rank", "1"],
    ],
)
def test_explicit_rendezvous_flags_switch_pod_defaults_off(flag: list[str]) -> None:
    args = parse(flag)
    before = vars(args).copy()
    dest = flag[0].lstrip("-").replace("-", "_")
    notes = apply_pod_defaults(args, {dest}, {**POD, "TRAINKIT_NNODES": "3"})
    assert vars(args) == before
    assert notes == [f"pod defaults off: rendezvous chosen explicitly ({flag[0]})"]


def test_explicit_nnodes_local_addr_and_conf_are_kept() -> None:
    args = parse(["--nnodes", "5", "--local-addr", "1.2.3.4", "--rdzv-conf", "join_timeout=9"])
    apply_pod_defaults(
        args,
        {"nnodes", "local_addr", "rdzv_conf"},
        {**POD, "TRAINKIT_NNODES": "3", "TRAINKIT_RDZV_STORE": "st"},
    )
    assert (args.nnodes, args.local_addr, args.rdzv_conf, args.rdzv_backend) == (
        "5",
        "1.2.3.4",
        "join_timeout=9",
        "k8s",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("TRAINKIT_NNODES", "4:2"), ("TRAINKIT_NNODES", "x"), ("TRAINKIT_RDZV_PORT", "70000")],
)
def test_malformed_variables_are_named(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        apply_pod_defaults(parse([]), set(), {**POD, name: value})


def test_local_addr_is_the_pod_ip_that_identity_found(monkeypatch: pytest.MonkeyPatch) -> None:
    # No POD_IP from the downward API: kubelet's /etc/hosts line still names the pod's address.
    import launchers.pod_defaults as pod_defaults
    from trainkit.k8s.identity import PodIdentity

    identity = PodIdentity(
        hostname="w-1",
        subdomain="train",
        namespace="ml",
        cluster_domain="cluster.local",
        pod_name=None,
        pod_ip="10.4.0.9",
        workload="statefulset",
        ordinal=1,
        name_prefix="w",
        in_kubernetes=True,
        sources=(("pod_ip", "/etc/hosts"),),
    )
    monkeypatch.setattr(pod_defaults, "read_pod_identity", lambda env: identity)
    args = parse([])
    notes = apply_pod_defaults(
        args, set(), {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "TRAINKIT_NNODES": "1:4"}
    )
    assert args.local_addr == "10.4.0.9"
    assert "--local-addr 10.4.0.9 (the pod IP, from /etc/hosts)" in notes


def test_a_pod_ip_that_is_not_an_address_is_refused() -> None:
    with pytest.raises(ValueError, match=r"POD_IP: 'pod-ip' is not an IP address.*status\.podIP"):
        apply_pod_defaults(parse([]), set(), {**POD, "POD_IP": "pod-ip"})


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        ([], {}, "no node count given"),
        ([], {"TRAINKIT_NNODES": "1"}, "TRAINKIT_NNODES says 1"),
        (["--nnodes", "1:1"], {"TRAINKIT_NNODES": "3"}, "--nnodes says 1"),
        ([], {"PET_NNODES": "1"}, "--nnodes says 1"),  # torchrun's own variable for --nnodes
    ],
)
def test_one_node_in_a_statefulset_pod_stays_torchrun(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], said: str
) -> None:
    # `trainkit-run --nproc-per-node 1 train.py` in a StatefulSet pod with a Service: nothing says
    # there is a second node, so no k8s rendezvous (which needs peers and a job token).
    import launchers.pod_defaults as pod_defaults
    from trainkit.k8s.identity import PodIdentity

    identity = PodIdentity(
        hostname="notebook-1",
        subdomain="train",
        namespace="ml",
        cluster_domain="cluster.local",
        pod_name=None,
        pod_ip="10.4.0.9",
        workload="statefulset",
        ordinal=1,
        name_prefix="notebook",
    )
    monkeypatch.setattr(pod_defaults, "read_pod_identity", lambda env: identity)
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # PET_NNODES reaches --nnodes through torchrun's parser
    args = parse(["--nproc-per-node", "1", *argv])
    before = vars(args).copy()
    explicit = {"nnodes"} if argv or "PET_NNODES" in env else set()
    (note,) = apply_pod_defaults(args, explicit, {**POD, **env})
    assert vars(args) == before
    assert note.startswith(f"pod defaults off: one node ({said})")
    assert "ordinal 1 of a statefulset" in note


@pytest.mark.parametrize(
    ("argv", "env", "nnodes"),
    [
        ([], {"TRAINKIT_NNODES": "2"}, "2"),
        ([], {"TRAINKIT_NNODES": "1:8"}, "1:8"),  # elastic: one pod now, up to eight
        (["--nnodes", "1:4"], {}, "1:4"),
        (["--nnodes", "3"], {"TRAINKIT_NNODES": "1"}, "3"),  # the command line wins
    ],
)
def test_more_than_one_node_turns_pod_defaults_on(
    argv: list[str], env: dict[str, str], nnodes: str
) -> None:
    args = parse(argv)
    apply_pod_defaults(args, {"nnodes"} if argv else set(), {**POD, **env})
    assert (args.rdzv_backend, args.nnodes) == ("k8s", nnodes)
