"""Pod identity from hostnames, downward-API variables and captured pod files."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit.k8s.identity import PodFiles, parse_ordinal, read_pod_identity, service_fqdn

# What kubelet writes into a StatefulSet pod (hostname w-10, serviceName train, namespace ml).
HOSTS = """# Kubernetes-managed hosts file.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
10.4.2.17\tw-10.train.ml.svc.corp.internal\tw-10
"""
RESOLV = """search ml.svc.corp.internal svc.corp.internal corp.internal
nameserver 10.96.0.10
options ndots:5
"""


def pod_files(
    tmp_path: Path, *, hosts: str = HOSTS, resolv: str = RESOLV, namespace: str | None = "ml"
) -> PodFiles:
    (tmp_path / "hosts").write_text(hosts)
    (tmp_path / "resolv.conf").write_text(resolv)
    if namespace is not None:
        (tmp_path / "namespace").write_text(namespace)
    return PodFiles(
        hosts=str(tmp_path / "hosts"),
        resolv_conf=str(tmp_path / "resolv.conf"),
        namespace=str(tmp_path / "namespace"),
    )


@pytest.mark.parametrize(
    ("hostname", "env", "expected"),
    [
        ("w-10", {}, ("statefulset", 10, "w")),
        ("w-2", {}, ("statefulset", 2, "w")),
        ("my-job-3", {"JOB_COMPLETION_INDEX": "3"}, ("indexed-job", 3, "my-job")),
        ("train-workers-2-0", {"JOB_COMPLETION_INDEX": "0"}, ("jobset", 2, "train-workers")),
        (
            "train-workers-1-1",
            {"JOB_COMPLETION_INDEX": "1", "TRAINKIT_PODS_PER_JOB": "4"},
            ("jobset", 5, "train-workers"),
        ),
        ("pj-worker-1", {"PET_NODE_RANK": "2"}, ("pytorchjob", 2, "pj")),
        ("runner", {}, (None, None, None)),
        (
            "job-1-3",
            {"JOB_COMPLETION_INDEX": "3", "TRAINKIT_WORKLOAD": "indexed-job"},
            ("indexed-job", 3, "job-1"),
        ),
    ],
)
def test_ordinals_from_workload_conventions(hostname: str, env: dict, expected: tuple) -> None:
    workload, ordinal, prefix, _, _ = parse_ordinal(hostname, env)
    assert (workload, ordinal, prefix) == expected


@pytest.mark.parametrize(
    ("hostname", "env", "message"),
    [
        ("w-1", {"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX='x'"),
        (
            "t-w-0-2",
            {"JOB_COMPLETION_INDEX": "2", "TRAINKIT_PODS_PER_JOB": "2"},
            "TRAINKIT_PODS_PER_JOB=2",
        ),
        ("w-1", {"TRAINKIT_WORKLOAD": "deployment"}, "TRAINKIT_WORKLOAD='deployment'"),
        ("w-1", {"PET_NODE_RANK": "-1"}, "PET_NODE_RANK='-1'"),
    ],
)
def test_bad_ordinal_inputs_name_the_variable(hostname: str, env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_ordinal(hostname, env)


def test_identity_from_kubelet_files(tmp_path: Path) -> None:
    identity = read_pod_identity(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, hostname="w-10", files=pod_files(tmp_path)
    )
    assert (identity.subdomain, identity.namespace, identity.cluster_domain) == (
        "train",
        "ml",
        "corp.internal",
    )
    assert (identity.pod_ip, identity.ordinal, identity.in_kubernetes) == ("10.4.2.17", 10, True)
    assert identity.peer_fqdn(2) == "w-2.train.ml.svc.corp.internal"
    assert identity.peer_hostname(10) == "w-10"
    assert identity.as_dict()["sources"]["pod_ip"].endswith("hosts")


def test_downward_api_wins_over_files(tmp_path: Path) -> None:
    env = {
        "POD_IP": "fd00::17",
        "POD_NAMESPACE": "other",
        "POD_NAME": "w-10",
        "TRAINKIT_CLUSTER_DOMAIN": "k.local",
    }
    identity = read_pod_identity(env, hostname="w-10", files=pod_files(tmp_path))
    assert (identity.pod_ip, identity.namespace, identity.cluster_domain, identity.pod_name) == (
        "fd00::17",
        "other",
        "k.local",
        "w-10",
    )


def test_namespace_and_zone_from_resolv_conf_without_fqdn_line(tmp_path: Path) -> None:
    files = pod_files(tmp_path, hosts="127.0.0.1 localhost\n", namespace=None)
    identity = read_pod_identity({}, hostname="w-0", files=files)
    assert (identity.namespace, identity.cluster_domain, identity.subdomain, identity.pod_ip) == (
        "ml",
        "corp.internal",
        None,
        None,
    )
    with pytest.raises(ValueError, match=r"spec\.subdomain"):
        identity.peer_fqdn(1)


def test_defaults_outside_a_pod(tmp_path: Path) -> None:
    files = PodFiles(
        hosts=str(tmp_path / "none"),
        resolv_conf=str(tmp_path / "none"),
        namespace=str(tmp_path / "none"),
    )
    identity = read_pod_identity({}, hostname="laptop", files=files)
    assert (
        identity.namespace,
        identity.cluster_domain,
        identity.ordinal,
        identity.in_kubernetes,
    ) == ("default", "cluster.local", None, False)
    with pytest.raises(ValueError, match="no ordinal"):
        identity.peer_hostname(0)


def test_bad_pod_ip_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"status\.podIP"):
        read_pod_identity({"POD_IP": "not-an-ip"}, hostname="w-0", files=pod_files(tmp_path))


def test_jobset_peer_names_follow_job_and_pod_index() -> None:
    identity = read_pod_identity(
        {"JOB_COMPLETION_INDEX": "1", "TRAINKIT_PODS_PER_JOB": "2"},
        hostname="js-w-0-1",
        files=PodFiles(hosts="/nonexistent", resolv_conf="/nonexistent", namespace="/nonexistent"),
    )
    assert identity.ordinal == 1
    assert [identity.peer_hostname(i) for i in range(4)] == [
        "js-w-0-0",
        "js-w-0-1",
        "js-w-1-0",
        "js-w-1-1",
    ]


def test_service_fqdn() -> None:
    assert service_fqdn("train", "ml", "cluster.local") == "train.ml.svc.cluster.local"
    assert (
        service_fqdn("train.other.svc.cluster.local.", "ml", "cluster.local")
        == "train.other.svc.cluster.local"
    )
