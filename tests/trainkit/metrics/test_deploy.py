"""deploy/metrics manifests: parse, use only real API field names, and agree with each other.

Kubernetes kinds are checked against the 1.30 schemas and KEDA/Prometheus-Operator resources
against the field lists of tests/deploy (shared with the manifests' own tests); prometheus-adapter's
config format (docs/config.md) against the field list here. An unknown or misspelled key fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import validation_problems
from trainkit.metrics.collector import METRIC_NAMES

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "metrics"

# name -> (allowed keys, required keys, {key: child schema name or [child schema name] for lists})
SCHEMAS: dict[str, tuple[set[str], set[str], dict[str, object]]] = {
    # prometheus-adapter config
    "AdapterConfig": (
        {"rules", "resourceRules", "externalRules"},
        {"rules"},
        {"rules": ["AdapterRule"]},
    ),
    "AdapterRule": (
        {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"},
        {"seriesQuery", "metricsQuery"},
        {"resources": "AdapterResources", "name": "AdapterName"},
    ),
    "AdapterResources": ({"overrides", "template", "namespaced"}, set(), {}),
    "AdapterName": ({"matches", "as"}, {"matches"}, {}),
}
KEDA_PROMETHEUS_METADATA = {
    "serverAddress",
    "query",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "queryParameters",
    "unsafeSsl",
    "timeout",
}


def check(document: object, schema: str, path: str = "") -> None:
    allowed, required, children = SCHEMAS[schema]
    assert isinstance(document, dict), f"{path or schema}: expected a mapping"
    unknown = set(document) - allowed
    assert not unknown, (
        f"{path or schema}: unknown field(s) {sorted(unknown)} (allowed: {sorted(allowed)})"
    )
    missing = required - set(document)
    assert not missing, f"{path or schema}: missing required field(s) {sorted(missing)}"
    for key, child in children.items():
        if key not in document:
            continue
        if isinstance(child, list):
            assert isinstance(document[key], list) and document[key], (
                f"{path}.{key}: expected a non-empty list"
            )
            for index, item in enumerate(document[key]):
                check(item, child[0], f"{path}.{key}[{index}]")
        else:
            check(document[key], child, f"{path}.{key}")  # type: ignore[arg-type]


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def adapter_rules() -> list[dict]:
    return yaml.safe_load(load("prometheus-adapter-config.yaml")["data"]["config.yaml"])["rules"]


def test_the_validator_rejects_a_misspelled_field() -> None:
    hpa = load("hpa.yaml")
    hpa["spec"]["metrics"][0]["pods"]["targett"] = hpa["spec"]["metrics"][0]["pods"].pop("target")
    problems = validation_problems(hpa)
    assert problems and all("'target' is a required property" in p for p in problems), problems


def test_hpa_is_autoscaling_v2_on_a_pods_metric_the_adapter_serves() -> None:
    hpa = load("hpa.yaml")
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert not validation_problems(hpa)
    spec = hpa["spec"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods" and set(metric) == {"type", "pods"}
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?[mkMG]?", str(metric["pods"]["target"]["averageValue"]))
    assert metric["pods"]["metric"]["name"] in {rule["name"]["as"] for rule in adapter_rules()}
    for rules in spec["behavior"].values():
        assert rules["selectPolicy"] in {"Max", "Min", "Disabled"}
        assert all(policy["type"] in {"Pods", "Percent"} for policy in rules["policies"])


def test_adapter_rules_select_exposed_series_by_namespace_and_pod() -> None:
    configmap = load("prometheus-adapter-config.yaml")
    assert not validation_problems(configmap)
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    check(config, "AdapterConfig")
    exposed = set()
    for name in METRIC_NAMES:
        exposed |= {name, f"{name}_total", f"{name}_sum", f"{name}_count", f"{name}_bucket"}
    for rule in config["rules"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
        assert series in exposed, f"rule selects {series}, which trainkit does not expose"
        assert re.search(rule["name"]["matches"], series), rule["name"]
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert (
            "<<.LabelMatchers>>" in rule["metricsQuery"]
            and "by (<<.GroupBy>>)" in rule["metricsQuery"]
        )
        for used in re.findall(r"trainkit_[a-z_]+", rule["metricsQuery"]):
            assert used in exposed, f"{rule['name']['as']}: {used} is not exposed"


def test_keda_scaled_object_targets_the_same_workload() -> None:
    scaled = load("keda-scaledobject.yaml")
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert not validation_problems(scaled)
    assert scaled["spec"]["scaleTargetRef"] == load("hpa.yaml")["spec"]["scaleTargetRef"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] in {
        "AverageValue",
        "Value",
        "Utilization",
    }
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_PROMETHEUS_METADATA, set(metadata) - KEDA_PROMETHEUS_METADATA
    assert {"serverAddress", "query", "threshold"} <= set(metadata)
    assert all(isinstance(v, str) for v in metadata.values()), (
        "KEDA trigger metadata values must be strings"
    )
    float(metadata["threshold"])
    assert "trainkit_samples_total" in metadata["query"]


def test_pod_monitor_scrapes_the_agent_port_and_keeps_trainkit_labels() -> None:
    from trainkit.metrics.exporter import DEFAULT_POD_METRICS_PORT

    monitor = load("podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert not validation_problems(monitor)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True and endpoint["path"] == "/metrics"
    # The shipped workloads name that port on the exporter's default (deploy/k8s, excerpted in README).
    statefulset = yaml.safe_load((DEPLOY.parent / "k8s/base/elastic/statefulset.yaml").read_text())
    (trainer,) = statefulset["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in trainer["ports"]}
    assert ports[endpoint["port"]] == DEFAULT_POD_METRICS_PORT
