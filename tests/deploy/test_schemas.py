"""Every manifest under deploy/ and every overlay as kubectl kustomize renders it validates:
built-in kinds against the Kubernetes 1.30 OpenAPI schemas in strict mode (kubernetes-validate,
unknown fields fail), custom resources (JobSet, PodMonitor, KEDA ScaledObject) against field lists
written from their API references (see custom_resources.py: their CRD schemas are not available
offline), with the Kubernetes types they embed checked against the real schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    KUBERNETES_VERSION,
    KUSTOMIZATIONS,
    OVERLAYS,
    load_documents,
    manifest_files,
    render,
    validation_problems,
)


def test_the_manifest_set_is_what_the_tests_expect() -> None:
    """The glob below finds the files: a renamed directory must not silently drop them."""
    names = {path.relative_to(DEPLOY).as_posix() for path in manifest_files()}
    assert "k8s/base/jobset/jobset.yaml" in names
    assert "k8s/base/elastic/statefulset.yaml" in names
    assert "metrics/hpa.yaml" in names
    assert {path.relative_to(K8S).as_posix() for path in OVERLAYS} == {
        f"overlays/{hardware}/{world}"
        for hardware in ("cpu-demo", "gpu-rdma")
        for world in ("jobset", "indexed-job", "elastic")
    }


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifest_file_validates(path: Path) -> None:
    problems = [problem for obj in load_documents(path) for problem in validation_problems(obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_rendered_overlay_validates(overlay: Path) -> None:
    objects = render(overlay)
    assert objects, f"{overlay} renders nothing"
    problems = [problem for obj in objects for problem in validation_problems(obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_overlay_with_preemptible_capacity_validates(overlay: Path, tmp_path: Path) -> None:
    """The opt-in preemptible component (commented out in the overlays) applies to every overlay."""
    component = K8S / "components" / "preemptible"
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{_relative(overlay, tmp_path)}]\n"
        f"components: [{_relative(component, tmp_path)}]\n"
    )
    objects = render(tmp_path)
    problems = [problem for obj in objects for problem in validation_problems(obj)]
    assert not problems, "\n".join(problems)
    assert any(obj["kind"] == "PriorityClass" for obj in objects)


@pytest.mark.parametrize(
    "directory",
    [k for k in KUSTOMIZATIONS if "overlays" not in k.parts and "components" not in k.parts],
    ids=lambda p: p.relative_to(DEPLOY).as_posix(),
)
def test_every_base_renders(directory: Path) -> None:
    problems = [problem for obj in render(directory) for problem in validation_problems(obj)]
    assert not problems, "\n".join(problems)


def test_an_unknown_field_is_caught() -> None:
    """The strict check can fail: a misspelt field in a built-in and in a custom kind."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"clusterIP": "None", "publishNotReadyAdresses": True},
    }
    assert validation_problems(service)
    jobset = load_documents(K8S / "base" / "jobset" / "jobset.yaml")[0]
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3
    assert any("maxRestart" in problem for problem in validation_problems(jobset))
    template = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    template["terminationGracePeriod"] = 1
    assert any("terminationGracePeriod" in problem for problem in validation_problems(jobset))
    (scaled_object,) = load_documents(DEPLOY / "metrics" / "keda-scaledobject.yaml")
    assert not validation_problems(scaled_object)
    behavior = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleUp"]["stabilisationWindowSeconds"] = 1
    assert any(
        "stabilisationWindowSeconds" in problem for problem in validation_problems(scaled_object)
    )


def _relative(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)


def test_a_misspelled_rayjob_field_is_caught() -> None:
    (_, rayjob) = load_documents(DEPLOY / "ray" / "rayjob.yaml")
    assert not validation_problems(rayjob)
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    workers["maxReplica"] = workers.pop("maxReplicas")
    workers["template"]["spec"]["terminationGracePeriod"] = 60
    problems = validation_problems(rayjob)
    assert any("maxReplica: unknown field" in problem for problem in problems), problems
    assert any("terminationGracePeriod" in problem for problem in problems), problems
