"""Values that must agree across the image, the manifests and the code, checked in every overlay
as kubectl kustomize renders it. Constants come from the code wherever the code has one, so a
change on either side fails here instead of in a cluster: a grace period shorter than
TRAINKIT_GRACE_PERIOD_S cuts the agreed save, a missing publishNotReadyAddresses stalls
rendezvous, a failure policy without exit 75 fails the job at the first preemption."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launchers.pod_defaults import DEFAULT_RDZV_PORT
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    OVERLAYS,
    ROOT,
    env_values,
    load_documents,
    pod_template,
    render,
    trainer,
    training_workloads,
    workloads,
)
from trainkit.exit_codes import EXIT_PREEMPTED, GRACE_PERIOD_VARIABLE
from trainkit.k8s.rendezvous import DEFAULT_PORT as K8S_RENDEZVOUS_DEFAULT_PORT
from trainkit.metrics.exporter import DEFAULT_POD_METRICS_PORT

# Seconds trainkit-run needs after the workers' grace period to report and exit before SIGKILL.
MIN_LAUNCHER_MARGIN_S = 5
MAX_LAUNCHER_MARGIN_S = 30
DOWNWARD_API = {
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_IP": "status.podIP",
    "NODE_NAME": "spec.nodeName",
}


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda p: p.relative_to(K8S).as_posix())
def rendered(request: pytest.FixtureRequest) -> list[dict]:
    return render(request.param)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def named_port(container: dict, name: str) -> int:
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name!r}: {ports}"
    return ports[name]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_code_constants_agree_with_each_other() -> None:
    assert DEFAULT_RDZV_PORT == K8S_RENDEZVOUS_DEFAULT_PORT == 29400
    assert DEFAULT_POD_METRICS_PORT == 9400
    assert EXIT_PREEMPTED == 75


def test_ports(rendered: list[dict]) -> None:
    for workload in training_workloads(rendered):
        container = trainer(workload)
        assert named_port(container, "c10d") == DEFAULT_RDZV_PORT
        assert named_port(container, "metrics") == DEFAULT_POD_METRICS_PORT
        env = env_values(container)
        assert env.get("TRAINKIT_RDZV_PORT") == str(DEFAULT_RDZV_PORT)
        # Metrics use the pod default (9400); a variable here would have to equal the port too.
        assert env.get("TRAINKIT_METRICS_PORT", str(DEFAULT_POD_METRICS_PORT)) == str(
            DEFAULT_POD_METRICS_PORT
        )
    for service in by_kind(rendered, "Service"):
        assert [port["port"] for port in service["spec"]["ports"]] == [DEFAULT_RDZV_PORT]
    for store in [w for w in workloads(rendered) if w["metadata"]["name"] == "trainkit-rdzv-store"]:
        container = pod_template(store)["spec"]["containers"][0]
        command = container["command"]
        assert command[command.index("--port") + 1] == str(DEFAULT_RDZV_PORT)
        assert named_port(container, "c10d") == DEFAULT_RDZV_PORT
    for podmonitor in by_kind(rendered, "PodMonitor"):
        for endpoint in podmonitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] == "metrics"


def test_grace_period_leaves_the_launcher_time_to_exit(rendered: list[dict]) -> None:
    for workload in training_workloads(rendered):
        spec = pod_template(workload)["spec"]
        grace_s = float(env_values(trainer(workload))[GRACE_PERIOD_VARIABLE])
        margin_s = spec["terminationGracePeriodSeconds"] - grace_s
        assert MIN_LAUNCHER_MARGIN_S <= margin_s <= MAX_LAUNCHER_MARGIN_S, (
            f"{workload['kind']}: terminationGracePeriodSeconds "
            f"{spec['terminationGracePeriodSeconds']} - {GRACE_PERIOD_VARIABLE} {grace_s} = "
            f"{margin_s} s; keep it {MIN_LAUNCHER_MARGIN_S}..{MAX_LAUNCHER_MARGIN_S} s"
        )


def _pod_failure_rules(job_spec: dict) -> tuple[dict, dict]:
    rules = job_spec["podFailurePolicy"]["rules"]
    exit_rules = [rule for rule in rules if "onExitCodes" in rule]
    disruption_rules = [
        rule
        for rule in rules
        if any(c["type"] == "DisruptionTarget" for c in rule.get("onPodConditions", []))
    ]
    assert len(exit_rules) == 1 and len(disruption_rules) == 1, rules
    return exit_rules[0], disruption_rules[0]


def test_preemption_is_retried_not_counted(rendered: list[dict]) -> None:
    for workload in training_workloads(rendered):
        kind = workload["kind"]
        if kind == "StatefulSet":
            assert pod_template(workload)["spec"].get("restartPolicy", "Always") == "Always"
            continue
        job_spec = (
            workload["spec"]["replicatedJobs"][0]["template"]["spec"]
            if kind == "JobSet"
            else workload["spec"]
        )
        assert pod_template(workload)["spec"]["restartPolicy"] == "Never"
        exit_rule, disruption_rule = _pod_failure_rules(job_spec)
        codes = exit_rule["onExitCodes"]
        assert codes["operator"] == "In" and codes["values"] == [EXIT_PREEMPTED]
        assert codes["containerName"] == trainer(workload)["name"]
        if kind == "Job":
            assert exit_rule["action"] == disruption_rule["action"] == "Ignore"
            assert workload["spec"]["podReplacementPolicy"] == "Failed"
        else:
            # The Job fails with reason PodFailurePolicy; the JobSet restarts without counting it.
            assert exit_rule["action"] == disruption_rule["action"] == "FailJob"
            rules = workload["spec"]["failurePolicy"]["rules"]
            first_match = next(r for r in rules if "PodFailurePolicy" in r["onJobFailureReasons"])
            assert first_match["action"] == "RestartJobSetAndIgnoreMaxRestarts"


def test_world_shape_and_rendezvous_names(rendered: list[dict]) -> None:
    services = {service["metadata"]["name"]: service for service in by_kind(rendered, "Service")}
    hpa = by_kind(rendered, "HorizontalPodAutoscaler")
    for workload in training_workloads(rendered):
        env = env_values(trainer(workload))
        pod = pod_template(workload)
        kind = workload["kind"]
        if kind == "JobSet":
            network = workload["spec"]["network"]
            replicated = workload["spec"]["replicatedJobs"][0]
            parallelism = replicated["template"]["spec"]["parallelism"]
            assert network["enableDNSHostnames"] and network["publishNotReadyAddresses"]
            assert env["TRAINKIT_SERVICE"] == network["subdomain"]
            assert env["TRAINKIT_PODS_PER_JOB"] == str(parallelism)
            assert env["TRAINKIT_NNODES"] == str(replicated["replicas"] * parallelism)
            assert replicated["template"]["spec"]["completions"] == parallelism
            continue
        service_name = (
            workload["spec"]["serviceName"] if kind == "StatefulSet" else pod["spec"]["subdomain"]
        )
        service = services[service_name]
        assert env["TRAINKIT_SERVICE"] == service_name
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert labels_match(service["spec"]["selector"], pod["metadata"]["labels"])
        if kind == "Job":
            assert env["TRAINKIT_NNODES"] == str(workload["spec"]["completions"])
            assert workload["spec"]["parallelism"] == workload["spec"]["completions"]
        else:
            (autoscaler,) = hpa
            target = autoscaler["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) == ("StatefulSet", workload["metadata"]["name"])
            minimum, maximum = env["TRAINKIT_NNODES"].split(":")
            assert int(minimum) <= autoscaler["spec"]["minReplicas"]
            assert int(maximum) == autoscaler["spec"]["maxReplicas"]
            store = services[env["TRAINKIT_RDZV_STORE"]]
            (store_deployment,) = [w for w in workloads(rendered) if w["kind"] == "Deployment"]
            assert labels_match(
                store["spec"]["selector"], pod_template(store_deployment)["metadata"]["labels"]
            )
            assert "--max-restarts" in trainer(workload)["args"]
    if not any(w["kind"] == "StatefulSet" for w in training_workloads(rendered)):
        assert not hpa, "a static world has nothing for an HPA to scale"


def test_downward_api_and_known_variables(rendered: list[dict]) -> None:
    code = "\n".join(
        path.read_text()
        for package in ("trainkit", "launchers")
        for path in (ROOT / package).rglob("*.py")
    )
    for workload in training_workloads(rendered):
        env = env_values(trainer(workload))
        for name, field in DOWNWARD_API.items():
            assert env[name] == {"fieldRef": {"fieldPath": field}}, name
        for name in env:
            assert f'"{name}"' in code, (
                f"{name} is set in the manifests but read nowhere in the code"
            )


def test_pending_variables_are_wired_as_secrets(rendered: list[dict]) -> None:
    """TRAINKIT_JOB_TOKEN comes from a Secret in every pod of the job (store included)."""
    for workload in workloads(rendered):
        containers = pod_template(workload)["spec"]["containers"]
        env = env_values(containers[0])
        assert env["TRAINKIT_JOB_TOKEN"] == {
            "secretKeyRef": {"name": "trainkit-job-token", "key": "token"}
        }


def test_pods_are_scraped_and_isolated(rendered: list[dict]) -> None:
    (podmonitor,) = by_kind(rendered, "PodMonitor")
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    policies = by_kind(rendered, "NetworkPolicy")
    for workload in workloads(rendered):
        labels = pod_template(workload)["metadata"]["labels"]
        assert labels_match(selector, labels), f"{workload['kind']} pods escape the PodMonitor"
        selecting = [
            p for p in policies if labels_match(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert len(selecting) == 1, f"{workload['kind']} pods: {len(selecting)} NetworkPolicies"
        (policy,) = selecting
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    # Another namespace reaches only the metrics port.
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "monitoring"
                    }
                    assert [p["port"] for p in rule["ports"]] == [DEFAULT_POD_METRICS_PORT]
                else:
                    # Peers in the namespace: only this job's own pods.
                    assert (
                        peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"]
                        == (labels["app.kubernetes.io/instance"])
                    )


def test_image_entrypoint_is_used(rendered: list[dict]) -> None:
    """Training containers keep the image's `tini -- trainkit-run`; a replaced command keeps tini."""
    for workload in workloads(rendered):
        for container in pod_template(workload)["spec"]["containers"]:
            if container["name"] == "trainer":
                assert "command" not in container
            else:
                assert container["command"][:2] == ["tini", "--"]


def test_gpu_rdma_pods(rendered: list[dict]) -> None:
    for workload in training_workloads(rendered):
        pod = pod_template(workload)
        container = trainer(workload)
        limits = container["resources"].get("limits", {})
        shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        nproc = container["args"][container["args"].index("--nproc-per-node") + 1]
        if "nvidia.com/gpu" not in limits:
            assert nproc == "1"
            continue
        assert nproc == str(limits["nvidia.com/gpu"]), "one worker per GPU"
        assert any(name.startswith("rdma/") for name in limits)
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
        assert pod["spec"]["securityContext"]["runAsUser"] == 0, "non-root gets no IPC_LOCK"
        assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
        assert env_values(container)["TRAINKIT_REQUIRE_RDMA"] == "1"


def test_dockerfile_agrees() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tini", "--", "trainkit-run"]' in text
    exposed = re.search(r"^EXPOSE (.+)$", text, re.M)
    assert exposed and set(exposed.group(1).split()) == {
        str(DEFAULT_RDZV_PORT),
        str(DEFAULT_POD_METRICS_PORT),
    }
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    for workload_file in ("jobset/jobset.yaml", "indexed-job/job.yaml", "elastic/statefulset.yaml"):
        (workload,) = load_documents(K8S / "base" / workload_file)
        security = pod_template(workload)["spec"]["securityContext"]
        assert f"{security['runAsUser']}:{security['runAsGroup']}" == user[-1]


def test_keda_alternative_targets_the_elastic_statefulset() -> None:
    (scaled_object,) = load_documents(DEPLOY / "metrics" / "keda-scaledobject.yaml")
    (statefulset,) = load_documents(K8S / "base" / "elastic" / "statefulset.yaml")
    target = scaled_object["spec"]["scaleTargetRef"]
    assert target.get("kind") == "StatefulSet" and target["name"] == statefulset["metadata"]["name"]
    maximum = env_values(trainer(statefulset))["TRAINKIT_NNODES"].split(":")[1]
    assert scaled_object["spec"]["maxReplicaCount"] == int(maximum)
    query = scaled_object["spec"]["triggers"][0]["metadata"]["query"]
    assert f'pod=~"{statefulset["metadata"]["name"]}-[0-9]+"' in query


def test_path_helpers_cover_all_overlays() -> None:
    assert all(Path(overlay).is_dir() for overlay in OVERLAYS) and len(OVERLAYS) == 6


@pytest.mark.parametrize("script", sorted((DEPLOY / "image").glob("*.sh")), ids=lambda p: p.name)
def test_image_scripts_parse(script: Path) -> None:
    """The opt-in image scripts (run by `make image`, not by the tests) at least parse."""
    import subprocess

    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
