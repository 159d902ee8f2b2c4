"""Loading deploy/'s manifests for the tests: plain files, overlays as kubectl kustomize renders
them, and the pod templates inside any workload kind."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))
KUBERNETES_VERSION = "1.30.0"
WORKLOAD_KINDS = ("JobSet", "Job", "StatefulSet", "Deployment")


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/ that holds Kubernetes objects (not kustomize's own files and
    not the patches of components and bases, which are fragments of objects)."""
    files = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if ".build" in path.parts or path.name == "kustomization.yaml":
            continue
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        if all(
            isinstance(doc, dict) and "kind" in doc and "$patch" not in doc for doc in documents
        ):
            files.append(path)
    return files


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with kustomize) is not installed: overlays cannot be rendered here")
    return path


def render(directory: Path) -> list[dict]:
    """``kubectl kustomize DIRECTORY`` as a list of objects; the command's error on failure."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def pod_template(workload: dict) -> dict:
    """The pod template (metadata + spec) of a JobSet's first replicated Job, a Job, a
    StatefulSet or a Deployment."""
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    return workload["spec"]["template"]


def workloads(objects: list[dict]) -> Iterator[dict]:
    return (obj for obj in objects if obj["kind"] in WORKLOAD_KINDS)


def trainer(workload: dict) -> dict:
    """The training container (named ``trainer``) of a training workload."""
    containers = pod_template(workload)["spec"]["containers"]
    return next(c for c in containers if c["name"] == "trainer")


def env_values(container: dict) -> dict[str, object]:
    """name -> value (a string) or valueFrom (a dict) of a container's environment."""
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def training_workloads(objects: list[dict]) -> list[dict]:
    return [w for w in workloads(objects) if w["metadata"]["name"] == "trainkit-train"]


CUSTOM_KINDS = {"JobSet", "PodMonitor", "ScaledObject", "RayJob"}


def validation_problems(obj: dict) -> list[str]:
    """What is wrong with one object: built-in kinds against the Kubernetes schemas in strict mode,
    custom resources against the field lists of ``custom_resources``."""
    import kubernetes_validate

    from tests.deploy.custom_resources import check_custom_resource

    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") in CUSTOM_KINDS:
        return [f"{name}: {problem}" for problem in check_custom_resource(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        return [f"{name}: {error.message} at {path or '(top)'}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no Kubernetes {KUBERNETES_VERSION} schema for this kind"]
    return []
