"""Strict field checks for the custom resources in deploy/ (JobSet, PodMonitor, KEDA ScaledObject,
KubeRay RayJob).

Their published CRD schemas cannot be fetched here (no network), so these are field lists written
from the API references: JobSet from kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go,
PodMonitor from the prometheus-operator API reference (monitoring.coreos.com/v1), ScaledObject
from KEDA's reference (keda.sh/v1alpha1, KEDA 2.x), RayJob from KubeRay's API reference (ray.io/v1:
RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec). An unknown or
misspelled key, a missing required key or a value outside an enum fails. Embedded Kubernetes types
(a JobSet's Job template, a Ray group's pod template, label selectors) are checked against the
real Kubernetes schemas instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import kubernetes_validate

# name -> (allowed keys, required keys, {key: child type, or [child type] for a list})
Fields = tuple[set[str], set[str], dict[str, object]]

JOBSET_FAILURE_REASONS = {
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "PodFailurePolicy",
    "MaxFailedIndexesExceeded",
    "FailedIndexes",
}
ENUMS: dict[tuple[str, str], set[str]] = {
    ("FailurePolicy", "restartStrategy"): {"Recreate", "BlockingRecreate", "InPlaceRestart"},
    ("FailurePolicyRule", "action"): {
        "FailJobSet",
        "RestartJobSet",
        "RestartJobSetAndIgnoreMaxRestarts",
        "RestartJob",
        "RestartJobAndIgnoreMaxRestarts",
    },
}
ENUMS[("RayJobSpec", "submissionMode")] = {
    "K8sJobMode",
    "HTTPMode",
    "InteractiveMode",
    "SidecarMode",
}
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")

OBJECT_META: Fields = ({"name", "namespace", "labels", "annotations"}, {"name"}, {})
SCHEMAS: dict[str, Fields] = {
    "ObjectMeta": OBJECT_META,
    "JobSet": (
        {"apiVersion", "kind", "metadata", "spec"},
        {"apiVersion", "kind", "metadata", "spec"},
        {"metadata": "ObjectMeta", "spec": "JobSetSpec"},
    ),
    "JobSetSpec": (
        {
            "replicatedJobs",
            "network",
            "successPolicy",
            "failurePolicy",
            "startupPolicy",
            "suspend",
            "coordinator",
            "managedBy",
            "ttlSecondsAfterFinished",
            "volumeClaimPolicies",
        },
        {"replicatedJobs"},
        {
            "replicatedJobs": ["ReplicatedJob"],
            "network": "Network",
            "failurePolicy": "FailurePolicy",
            "successPolicy": "SuccessPolicy",
        },
    ),
    "ReplicatedJob": (
        {"name", "groupName", "template", "replicas", "dependsOn"},
        {"name", "template"},
        {"template": "JobTemplateSpec"},
    ),
    "Network": ({"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}, set(), {}),
    "SuccessPolicy": ({"operator", "targetReplicatedJobs"}, {"operator"}, {}),
    "FailurePolicy": (
        {"maxRestarts", "restartStrategy", "rules"},
        set(),
        {"rules": ["FailurePolicyRule"]},
    ),
    "FailurePolicyRule": (
        {
            "name",
            "action",
            "onJobFailureReasons",
            "onJobFailureMessagePatterns",
            "targetReplicatedJobs",
        },
        {"name", "action"},
        {},
    ),
    "PodMonitor": (
        {"apiVersion", "kind", "metadata", "spec"},
        {"apiVersion", "kind", "metadata", "spec"},
        {"metadata": "ObjectMeta", "spec": "PodMonitorSpec"},
    ),
    "PodMonitorSpec": (
        {
            "jobLabel",
            "podTargetLabels",
            "podMetricsEndpoints",
            "selector",
            "selectorMechanism",
            "namespaceSelector",
            "sampleLimit",
            "targetLimit",
            "labelLimit",
            "labelNameLengthLimit",
            "labelValueLengthLimit",
            "keepDroppedTargets",
            "attachMetadata",
            "scrapeClass",
            "scrapeProtocols",
            "bodySizeLimit",
        },
        {"selector"},
        {"podMetricsEndpoints": ["PodMetricsEndpoint"], "selector": "LabelSelector"},
    ),
    "PodMetricsEndpoint": (
        {
            "port",
            "portNumber",
            "targetPort",
            "path",
            "scheme",
            "params",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "honorTimestamps",
            "trackTimestampsStaleness",
            "metricRelabelings",
            "relabelings",
            "proxyUrl",
            "followRedirects",
            "enableHttp2",
            "filterRunning",
            "basicAuth",
            "bearerTokenSecret",
            "oauth2",
            "authorization",
            "tlsConfig",
        },
        set(),
        {},
    ),
    "ScaledObject": (
        {"apiVersion", "kind", "metadata", "spec"},
        {"apiVersion", "kind", "metadata", "spec"},
        {"metadata": "ObjectMeta", "spec": "ScaledObjectSpec"},
    ),
    "ScaledObjectSpec": (
        {
            "scaleTargetRef",
            "pollingInterval",
            "initialCooldownPeriod",
            "cooldownPeriod",
            "idleReplicaCount",
            "minReplicaCount",
            "maxReplicaCount",
            "advanced",
            "triggers",
            "fallback",
        },
        {"scaleTargetRef", "triggers"},
        {
            "scaleTargetRef": "ScaleTarget",
            "advanced": "AdvancedConfig",
            "triggers": ["ScaleTrigger"],
            "fallback": "Fallback",
        },
    ),
    "ScaleTarget": ({"apiVersion", "kind", "name", "envSourceContainerName"}, {"name"}, {}),
    "AdvancedConfig": (
        {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"},
        set(),
        {"horizontalPodAutoscalerConfig": "HorizontalPodAutoscalerConfig"},
    ),
    "HorizontalPodAutoscalerConfig": ({"name", "behavior"}, set(), {"behavior": "HPABehavior"}),
    "ScaleTrigger": (
        {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"},
        {"type", "metadata"},
        {},
    ),
    "Fallback": (
        {"failureThreshold", "replicas", "behavior"},
        {"failureThreshold", "replicas"},
        {},
    ),
    # ray.io/v1 (KubeRay)
    "RayJob": (
        {"apiVersion", "kind", "metadata", "spec"},
        {"apiVersion", "kind", "metadata", "spec"},
        {"metadata": "ObjectMeta", "spec": "RayJobSpec"},
    ),
    "RayJobSpec": (
        {
            "activeDeadlineSeconds",
            "backoffLimit",
            "clusterSelector",
            "deletionStrategy",
            "entrypoint",
            "entrypointNumCpus",
            "entrypointNumGpus",
            "entrypointResources",
            "jobId",
            "managedBy",
            "metadata",
            "rayClusterSpec",
            "runtimeEnvYAML",
            "shutdownAfterJobFinishes",
            "submissionMode",
            "submitterConfig",
            "submitterPodTemplate",
            "suspend",
            "ttlSecondsAfterFinished",
        },
        set(),
        {"rayClusterSpec": "RayClusterSpec", "submitterPodTemplate": "PodTemplateSpec"},
    ),
    "RayClusterSpec": (
        {
            "autoscalerOptions",
            "enableInTreeAutoscaling",
            "gcsFaultToleranceOptions",
            "headGroupSpec",
            "headServiceAnnotations",
            "managedBy",
            "rayVersion",
            "suspend",
            "workerGroupSpecs",
        },
        {"headGroupSpec"},
        {"headGroupSpec": "HeadGroupSpec", "workerGroupSpecs": ["WorkerGroupSpec"]},
    ),
    "HeadGroupSpec": (
        {"enableIngress", "headService", "rayStartParams", "serviceType", "template"},
        {"template"},
        {"template": "PodTemplateSpec"},
    ),
    "WorkerGroupSpec": (
        {
            "groupName",
            "idleTimeoutSeconds",
            "maxReplicas",
            "minReplicas",
            "numOfHosts",
            "rayStartParams",
            "replicas",
            "scaleStrategy",
            "suspend",
            "template",
        },
        {"groupName", "template"},
        {"template": "PodTemplateSpec"},
    ),
}


def _validate_builtin(obj: dict, where: str) -> list[str]:
    """An embedded Kubernetes type, wrapped in its built-in kind, against the real schema (strict)."""
    try:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {error.message} at {'.'.join(map(str, error.path))}"]
    return []


def _validate_hpa_behavior(behavior: object, where: str) -> list[str]:
    """A ScaledObject's HPA behavior against the real autoscaling/v2 schema (strict)."""
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior"},
        "spec": {"scaleTargetRef": {"kind": "StatefulSet", "name": "x"}, "maxReplicas": 1},
    }
    hpa["spec"]["behavior"] = behavior
    return _validate_builtin(hpa, where)


def _validate_job_template(template: object, where: str) -> list[str]:
    """A JobSet's Job template against the real batch/v1 Job schema (strict)."""
    if not isinstance(template, dict):
        return [f"{where}: expected a mapping"]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "template", **template.get("metadata", {})},
        "spec": template.get("spec", {}),
    }
    unknown = set(template) - {"metadata", "spec"}
    return _validate_builtin(job, where) + [
        f"{where}.{key}: unknown field" for key in sorted(unknown)
    ]


def _validate_pod_template(template: object, where: str) -> list[str]:
    """A Ray group's pod template against the real v1 PodTemplate schema (strict)."""
    pod_template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "template"},
        "template": template,
    }
    return _validate_builtin(pod_template, where)


def _validate_label_selector(selector: object, where: str) -> list[str]:
    allowed = {"matchLabels", "matchExpressions"}
    if not isinstance(selector, dict):
        return [f"{where}: expected a mapping"]
    return [f"{where}.{key}: unknown field" for key in sorted(set(selector) - allowed)]


SPECIAL: dict[str, Callable[[object, str], list[str]]] = {
    "JobTemplateSpec": _validate_job_template,
    "LabelSelector": _validate_label_selector,
    "HPABehavior": _validate_hpa_behavior,
    "PodTemplateSpec": _validate_pod_template,
}


def check(value: object, type_name: str, where: str) -> list[str]:
    """Problems of ``value`` read as ``type_name``, each naming its path."""
    if type_name in SPECIAL:
        return SPECIAL[type_name](value, where)
    if not isinstance(value, dict):
        return [f"{where}: expected a mapping for {type_name}, got {value!r}"]
    allowed, required, children = SCHEMAS[type_name]
    problems = [f"{where}.{key}: unknown field of {type_name}" for key in set(value) - allowed]
    problems += [f"{where}.{key}: required by {type_name}" for key in required - set(value)]
    for key, item in value.items():
        if (type_name, key) in ENUMS and item not in ENUMS[type_name, key]:
            problems.append(
                f"{where}.{key}: {item!r} is not one of {sorted(ENUMS[type_name, key])}"
            )
        child = children.get(key)
        if isinstance(child, list):
            for index, element in enumerate(item):
                problems += check(element, child[0], f"{where}.{key}[{index}]")
        elif isinstance(child, str):
            problems += check(item, child, f"{where}.{key}")
    if type_name == "FailurePolicyRule":
        if not RULE_NAME.match(str(value.get("name", ""))):
            problems.append(
                f"{where}.name: {value.get('name')!r} does not match {RULE_NAME.pattern}"
            )
        for reason in value.get("onJobFailureReasons", []):
            if reason not in JOBSET_FAILURE_REASONS:
                problems.append(
                    f"{where}.onJobFailureReasons: {reason!r} is not a Job failure reason"
                )
    return problems


def check_custom_resource(obj: dict) -> list[str]:
    expected = {
        "JobSet": "jobset.x-k8s.io/v1alpha2",
        "PodMonitor": "monitoring.coreos.com/v1",
        "ScaledObject": "keda.sh/v1alpha1",
        "RayJob": "ray.io/v1",
    }
    kind = obj.get("kind")
    if kind not in expected:
        return [f"{kind}: no field list for this custom resource; add one to {__name__}"]
    problems = check(obj, kind, kind)
    if obj.get("apiVersion") != expected[kind]:
        problems.append(
            f"{kind}.apiVersion: {obj.get('apiVersion')!r}, expected {expected[kind]!r}"
        )
    return problems
