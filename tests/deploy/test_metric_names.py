"""Every metric name in the Grafana dashboard's PromQL, the prometheus-adapter rules, the HPA and
the KEDA query is one the exporter really emits: the names come from a real scrape of
PodCollector (workers' slots written by the Recorder, a GPU through the fake NVML)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests.deploy.manifests import DEPLOY, K8S
from tests.trainkit.metrics.fake_nvml import FakeGpu, FakeNvml
from trainkit.metrics.collector import PodCollector
from trainkit.metrics.gpu import GpuSampler
from trainkit.metrics.recorder import Recorder
from trainkit.world import World

DASHBOARD = K8S / "grafana" / "trainkit-dashboard.json"
METRIC_NAME = re.compile(r"\btrainkit_[a-z0-9_]+\b")
# prometheus-adapter's `as:` names are custom-metrics API names, not series.
ADAPTER_NAMES = {"trainkit_samples_per_second", "trainkit_step_seconds", "trainkit_data_wait_ratio"}


@pytest.fixture(scope="module")
def exposed_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    slots = tmp_path_factory.mktemp("slots")
    Recorder(slots, World()).step(64, tokens=640, loss=0.5)
    sampler = GpuSampler(FakeNvml([FakeGpu("GPU-a")]))
    sampler.sample()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(slots, job_start_unix_s=0.0, gpu=sampler))
    text = generate_latest(registry).decode()
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert "trainkit_samples_total" in names and "trainkit_gpu_utilization_ratio" in names
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if "definition" in variable
    ]
    return queries


def names_in(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


def test_dashboard_covers_the_training_and_gpu_questions() -> None:
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    for title in ("Throughput", "Step time", "Data wait", "Checkpoint stalls", "Goodput"):
        assert title in titles
    used = set().union(*map(names_in, dashboard_queries()))
    assert "trainkit_worker_restarts_total" in used
    assert any(name.startswith("trainkit_gpu_") for name in used)


@pytest.mark.parametrize("query", dashboard_queries())
def test_dashboard_names_exist(query: str, exposed_names: set[str]) -> None:
    missing = names_in(query) - exposed_names
    assert names_in(query), f"no trainkit metric in {query!r}"
    assert not missing, f"{sorted(missing)} in {query!r} are not exposed by the exporter"


def test_dashboard_panels_use_the_datasource_variable() -> None:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def _adapter_text() -> str:
    (config_map,) = yaml.safe_load_all(
        (DEPLOY / "metrics" / "prometheus-adapter-config.yaml").read_text()
    )
    return config_map["data"]["config.yaml"]


def test_adapter_and_keda_names_exist(exposed_names: set[str]) -> None:
    rules = yaml.safe_load(_adapter_text())["rules"]
    for rule in rules:
        for text in (rule["seriesQuery"], rule["metricsQuery"], rule["name"]["matches"]):
            missing = names_in(text) - exposed_names
            assert not missing, f"{sorted(missing)} in adapter rule {rule['name']['as']!r}"
    (keda,) = yaml.safe_load_all((DEPLOY / "metrics" / "keda-scaledobject.yaml").read_text())
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    assert names_in(query) and not names_in(query) - exposed_names, query


def test_hpa_metric_is_an_adapter_name() -> None:
    (hpa,) = yaml.safe_load_all((DEPLOY / "metrics" / "hpa.yaml").read_text())
    served = {rule["name"]["as"] for rule in yaml.safe_load(_adapter_text())["rules"]}
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in served


def test_a_wrong_name_is_caught(exposed_names: set[str]) -> None:
    assert names_in("rate(trainkit_sample_total[2m])") - exposed_names == {"trainkit_sample_total"}
    assert ADAPTER_NAMES.isdisjoint(exposed_names)


def test_dashboard_is_in_the_grafana_configmap() -> None:
    kustomization = yaml.safe_load((DASHBOARD.parent / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [DASHBOARD.name]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    assert Path(DASHBOARD).stat().st_size > 0
