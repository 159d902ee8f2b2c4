"""deploy/ray/rayjob.yaml agrees with trainkit-ray and with itself: the entrypoint parses, the script
exists, the stop and termination windows leave room for the agreed save, metrics are scrapeable."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from launchers.ray.cli import build_parser

ROOT = Path(__file__).parents[2]
MANIFEST = ROOT / "deploy" / "ray" / "rayjob.yaml"


def load_all() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def load() -> dict:
    return load_all()["RayJob"]


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def test_entrypoint_is_a_valid_trainkit_ray_command() -> None:
    job = load()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    command, *argv = shlex.split(job["spec"]["entrypoint"])
    assert command == "trainkit-ray"
    args = build_parser().parse_args(argv)
    assert (ROOT / args.training_script).is_file(), args.training_script
    assert args.max_failures > 0
    # Restarted workers on any pod resume from the same checkpoints and read the same shards:
    # both live on the PVC that the head and every worker mount.
    script_args = args.training_script_args
    shared = {script_args[script_args.index(flag) + 1] for flag in ("--checkpoint-dir", "--data")}
    claim = load_all()["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        for path in shared:
            mount = next(m for m in mounts if path.startswith(m + "/"))
            assert volumes[mounts[mount]] == claim["metadata"]["name"], (path, mount)

    # One Ray Train worker per worker pod: each pod offers one CPU to Ray.
    workers = cluster["workerGroupSpecs"]
    assert args.num_workers == 2 == sum(group["replicas"] for group in workers)
    assert all(group["rayStartParams"]["num-cpus"] == "1" for group in workers)


def test_stop_windows_leave_room_for_the_agreed_save() -> None:
    job = load()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    grace_s = float(runtime_env["env_vars"]["TRAINKIT_GRACE_PERIOD_S"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert float(env_of(head)["RAY_JOB_STOP_WAIT_TIME_S"]) > grace_s
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > grace_s


def test_worker_pods_expose_the_metrics_port_the_pod_monitor_scrapes() -> None:
    job = load()
    monitor = yaml.safe_load((ROOT / "deploy" / "metrics" / "podmonitor.yaml").read_text())
    assert job["metadata"]["namespace"] == monitor["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    port_name = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        container = template["spec"]["containers"][0]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports[port_name] == int(env_of(container)["TRAINKIT_METRICS_PORT"])
