"""The TRAINKIT_* parsers, and that every consumer of an environment fact gets it from its one owner."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from launchers.pod_defaults import apply_pod_defaults
from trainkit.env_vars import (
    NodeCount,
    parse_nnodes,
    read_cluster_domain,
    read_nnodes,
    read_pods_per_job,
    read_rdzv_port,
    read_require_rdma,
    read_workload,
)
from trainkit.k8s.dns import Answer
from trainkit.k8s.identity import PodFiles, read_pod_identity, running_in_kubernetes
from trainkit.k8s.report import describe_pod
from trainkit.world import World

REPO = Path(__file__).resolve().parents[2]


def test_node_count_is_a_number_or_a_range() -> None:
    assert read_nnodes({}) is None and read_nnodes({"TRAINKIT_NNODES": "  "}) is None
    assert read_nnodes({"TRAINKIT_NNODES": " 3 "}) == NodeCount(3, 3)
    assert read_nnodes({"TRAINKIT_NNODES": "2:4"}) == NodeCount(2, 4)
    assert str(NodeCount(3, 3)) == "3" and str(NodeCount(2, 4)) == "2:4"
    assert parse_nnodes("3:3", "PET_NNODES").is_fixed


@pytest.mark.parametrize("raw", ["0", "x", "+3", "-1", "2:", "1:2:3", "²", "4:2"])
def test_malformed_node_counts_name_the_variable_the_value_and_the_fix(raw: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"TRAINKIT_NNODES={raw!r}") + ".*(e.g.|MIN:MAX)"
    ):
        read_nnodes({"TRAINKIT_NNODES": raw})


def test_other_parsers_default_and_refuse_with_the_value() -> None:
    assert read_rdzv_port({}) == 29400 and read_rdzv_port({"TRAINKIT_RDZV_PORT": "29500"}) == 29500
    with pytest.raises(ValueError, match=r"TRAINKIT_RDZV_PORT='0'.*1\.\.65535"):
        read_rdzv_port({"TRAINKIT_RDZV_PORT": "0"})
    assert read_pods_per_job({}) == 1
    with pytest.raises(ValueError, match=r"TRAINKIT_PODS_PER_JOB='0' must be a positive integer"):
        read_pods_per_job({"TRAINKIT_PODS_PER_JOB": "0"})
    assert read_workload({"TRAINKIT_WORKLOAD": "JobSet"}) == "jobset"
    assert read_cluster_domain({"TRAINKIT_CLUSTER_DOMAIN": "corp.example. "}) == "corp.example"
    assert (
        read_require_rdma({}) is False
        and read_require_rdma({"TRAINKIT_REQUIRE_RDMA": "0"}) is False
    )
    assert read_require_rdma({"TRAINKIT_REQUIRE_RDMA": "1"}) is True
    with pytest.raises(ValueError, match=r"TRAINKIT_REQUIRE_RDMA='true': expected 1"):
        read_require_rdma({"TRAINKIT_REQUIRE_RDMA": "true"})


class NoRecords:
    def query(self, name: str, rdtype: str) -> Answer:
        return Answer(name, rdtype, "NXDOMAIN")


def node_counts_seen(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """What the worker (World), the launcher (pod defaults) and the doctor (report) make of ``env``."""
    import trainkit.k8s.report as report_module

    (tmp_path / "hosts").write_text("10.4.0.8\tw-1.train.ml.svc.cluster.local\tw-1\n")
    (tmp_path / "resolv.conf").write_text("search ml.svc.cluster.local svc.cluster.local\n")
    files = PodFiles(
        hosts=str(tmp_path / "hosts"),
        resolv_conf=str(tmp_path / "resolv.conf"),
        namespace=str(tmp_path / "none"),
    )
    monkeypatch.setattr(
        report_module,
        "read_pod_identity",
        lambda env: read_pod_identity(env, hostname="w-1", files=files),
    )
    seen: dict[str, object] = {}
    try:
        seen["world"] = World.from_env(env).num_nodes
    except ValueError as error:
        seen["world"] = str(error)
    args = get_args_parser().parse_args(["train.py"])
    try:
        apply_pod_defaults(args, set(), env)
        seen["launcher"] = int(args.nnodes)
    except ValueError as error:
        seen["launcher"] = str(error)
    report = describe_pod(env, resolver=NoRecords())
    node_count_problems = [problem for problem in report["problems"] if "NNODES" in problem]
    peers_looked_up = {entry["name"].split(".")[0] for entry in report["dns"]} - {"train"}
    seen["doctor"] = node_count_problems[0] if node_count_problems else len(peers_looked_up)
    return seen


@pytest.mark.parametrize("raw", ["3", " 3 ", "+3", "0", "three"])
def test_one_environment_gives_one_node_count_everywhere(
    raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "JOB_COMPLETION_INDEX": "1",
        "TRAINKIT_SERVICE": "train",
        "TRAINKIT_NNODES": raw,
    }
    seen = node_counts_seen(env, tmp_path, monkeypatch)
    if raw.strip() == "3":
        assert seen == {"world": 3, "launcher": 3, "doctor": 3}
    else:
        # Every reader refuses it with the parser's one message, naming the variable and value.
        message = f"TRAINKIT_NNODES={raw!r}: expected N or MIN:MAX"
        assert all(message in str(value) for value in seen.values()), seen


def test_only_identity_decides_whether_this_is_a_pod() -> None:
    assert running_in_kubernetes({"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert not running_in_kubernetes({"KUBERNETES_SERVICE_HOST": ""})
    identity = read_pod_identity({}, hostname="w-0", files=PodFiles(hosts="/nonexistent"))
    assert identity.in_kubernetes is False


# Variables whose parser lives outside trainkit/env_vars.py by design, and where.
OWNED_ELSEWHERE = {
    "TRAINKIT_GRACE_PERIOD_S": "trainkit/preemption.py",
    "TRAINKIT_EXIT_STATUS_DIR": "trainkit/preemption.py",
    "TRAINKIT_METRICS_PORT": "trainkit/metrics/",
    "TRAINKIT_METRICS_ADDR": "trainkit/metrics/",
    "TRAINKIT_METRICS_DIR": "trainkit/metrics/",
    "TRAINKIT_METRICS_HOST": "trainkit/metrics/",
    "TRAINKIT_JOB_TOKEN": "trainkit/k8s/signed_state.py",
    "TRAINKIT_RDZV_ALLOW_UNAUTHENTICATED": "trainkit/k8s/signed_state.py",
}


# Still deciding "am I in a pod" themselves until trainkit.metrics switches to the identity's answer.
def string_literals(name_pattern: str) -> dict[str, set[str]]:
    """``{path: {names}}`` of each quoted, whole string literal matching ``name_pattern``."""
    literal = re.compile(r"""["'](""" + name_pattern + r""")["']""")
    found: dict[str, set[str]] = {}
    for package in ("trainkit", "launchers"):
        for path in sorted((REPO / package).rglob("*.py")):
            names = set(literal.findall(path.read_text()))
            if names:
                found[str(path.relative_to(REPO))] = names
    return found


def test_every_trainkit_variable_is_read_in_its_one_module() -> None:
    strays = {
        (path, name)
        for path, names in string_literals(r"TRAINKIT_[A-Z0-9_]+").items()
        for name in names
        if path != "trainkit/env_vars.py"
        and not path.startswith(OWNED_ELSEWHERE.get(name, "trainkit/env_vars.py"))
    }
    assert not strays, (
        "read these through a parser in trainkit/env_vars.py (or its owner in OWNED_ELSEWHERE)"
    )


def test_kubernetes_service_host_is_read_only_by_the_pod_identity() -> None:
    readers = set(string_literals("KUBERNETES_SERVICE_HOST"))
    assert readers == {"trainkit/k8s/identity.py"}
