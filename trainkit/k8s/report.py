"""This pod's identity and what DNS says about its peers, as data and as text for ``trainkit doctor``.

Only reads (environment, pod files, one round of DNS lookups); never waits for peers and never
raises on a missing record: a report says what is there and what is not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from trainkit.env_vars import SERVICE_VARIABLE, parse_nnodes, read_nnodes, read_service
from trainkit.k8s.dns import OK, Resolver, default_resolver
from trainkit.k8s.identity import IN_KUBERNETES_VARIABLE, read_pod_identity, service_fqdn

__all__ = ["describe_pod", "format_pod_report"]


def _service_name(env: Mapping[str, str], subdomain: str | None) -> tuple[str | None, str]:
    service = read_service(env)
    if service is not None:
        return service, SERVICE_VARIABLE
    if subdomain:
        return subdomain, "pod subdomain"
    return None, "none"


def _expected_num_pods(env: Mapping[str, str]) -> int | None:
    """The job's (largest) pod count from ``TRAINKIT_NNODES``, else ``PET_NNODES``; None if unknown."""
    node_count = read_nnodes(env)
    if node_count is None and env.get("PET_NNODES", "").strip():
        node_count = parse_nnodes(env["PET_NNODES"], "PET_NNODES")
    return None if node_count is None else node_count.max_nodes


def describe_pod(
    env: Mapping[str, str] | None = None,
    *,
    timeout_s: float = 5.0,
    resolver: Resolver | None = None,
    num_peers: int | None = None,
) -> dict:
    """JSON-able report: ``identity``, ``service`` and ``dns`` (one answer per lookup), ``problems``.

    Peers looked up: ordinals ``0..num_peers-1`` (default from ``TRAINKIT_NNODES``/``PET_NNODES``,
    else this pod's ordinal and ordinal 0). ``timeout_s`` bounds each DNS query.
    """
    env = os.environ if env is None else env
    report: dict = {"identity": None, "service": None, "dns": [], "problems": []}
    try:
        identity = read_pod_identity(env)
    except ValueError as error:
        report["problems"].append(str(error))
        return report
    report["identity"] = identity.as_dict()
    if not identity.in_kubernetes:
        report["problems"].append(
            f"{IN_KUBERNETES_VARIABLE} is not set: this does not look like a pod"
        )
    service, source = _service_name(env, identity.subdomain)
    if service is None:
        report["problems"].append(
            "no headless Service known: set spec.subdomain (StatefulSet: serviceName) or TRAINKIT_SERVICE"
        )
        return report
    fqdn = service_fqdn(service, identity.namespace, identity.cluster_domain)
    report["service"] = {"name": fqdn, "source": source}
    try:
        resolver = resolver or default_resolver(timeout_s=timeout_s)
    except Exception as error:  # a pod without a usable resolv.conf: report it, do not crash doctor
        report["problems"].append(f"DNS unusable: {error}")
        return report

    if num_peers is None:
        try:
            num_peers = _expected_num_pods(env)
        except ValueError as error:  # reported; the lookups below still run for the known ordinals
            report["problems"].append(str(error))
    ordinals: list[int] = []
    if (
        identity.ordinal is not None
        and identity.workload is not None
        and identity.name_prefix is not None
    ):
        ordinals = list(range(num_peers)) if num_peers else sorted({0, identity.ordinal})
    names = [fqdn] + [identity.peer_fqdn(o, service) for o in ordinals]
    for name in names:
        for rdtype in ("A", "AAAA"):
            answer = resolver.query(name, rdtype)
            report["dns"].append(
                {
                    "name": name,
                    "type": rdtype,
                    "status": answer.status,
                    "values": list(answer.values),
                }
            )
    found = {entry["name"] for entry in report["dns"] if entry["status"] == OK}
    if fqdn not in found:
        report["problems"].append(
            f"{fqdn} has no records: create the headless Service (clusterIP: None) with "
            "publishNotReadyAddresses: true"
        )
    missing = [name for name in names[1:] if name not in found]
    if missing:
        report["problems"].append(
            f"no records for {', '.join(missing)}: those pods are missing, not yet started, or lack "
            f"spec.subdomain: {service}"
        )
    return report


def format_pod_report(report: dict) -> str:
    """Human-readable text of ``describe_pod``'s report."""
    lines = ["Pod identity"]
    identity = report.get("identity")
    if identity:
        sources = identity.get("sources", {})
        for key in (
            "hostname",
            "pod_name",
            "namespace",
            "subdomain",
            "cluster_domain",
            "pod_ip",
            "workload",
            "ordinal",
        ):
            origin = f"  (from {sources[key]})" if key in sources else ""
            lines.append(f"  {key:<15} {identity.get(key)}{origin}")
    else:
        lines.append("  unknown")
    service = report.get("service")
    if service:
        lines.append(f"Headless Service {service['name']} (from {service['source']})")
    if report.get("dns"):
        lines.append("DNS")
        for entry in report["dns"]:
            shown = ", ".join(entry["values"]) if entry["values"] else entry["status"]
            lines.append(f"  {entry['name']} {entry['type']}: {shown}")
    problems = report.get("problems", [])
    lines.append("Problems" if problems else "No problems found")
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)
