"""Who this pod is: hostname, subdomain, namespace, pod IP, cluster domain and its ordinal.

Reads only what a pod really has (environment, /etc/hosts, /etc/resolv.conf, the service-account
namespace file); never talks to the Kubernetes API and never mutates anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from trainkit.env_vars import (
    CLUSTER_DOMAIN_VARIABLE,
    SUBDOMAIN_VARIABLE,
    WORKLOAD_KINDS,
    read_cluster_domain,
    read_pods_per_job,
    read_subdomain,
    read_workload,
)

__all__ = [
    "DEFAULT_CLUSTER_DOMAIN",
    "IN_KUBERNETES_VARIABLE",
    "WORKLOAD_KINDS",
    "PodFiles",
    "PodIdentity",
    "parse_ordinal",
    "read_pod_identity",
    "running_in_kubernetes",
    "service_fqdn",
]

DEFAULT_CLUSTER_DOMAIN = "cluster.local"

#: kubelet gives every container this variable (the API server's Service), service links or not.
IN_KUBERNETES_VARIABLE = "KUBERNETES_SERVICE_HOST"

_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class PodFiles:
    """Where the pod files are read from; tests point these at captured copies."""

    hosts: str = "/etc/hosts"
    resolv_conf: str = "/etc/resolv.conf"
    namespace: str = _SA_NAMESPACE_FILE


@dataclass(frozen=True, kw_only=True)
class PodIdentity:
    """One pod as its peers see it.

    ``workload`` is one of ``WORKLOAD_KINDS`` or ``None`` (no ordinal found); ``ordinal`` is the
    pod's index in its workload (the static node rank); ``name_prefix`` and ``pods_per_job`` let
    ``peer_hostname`` name any other ordinal's pod. ``sources`` says where each field came from.
    """

    hostname: str
    subdomain: str | None
    namespace: str
    cluster_domain: str
    pod_name: str | None
    pod_ip: str | None
    workload: str | None
    ordinal: int | None
    name_prefix: str | None
    pods_per_job: int = 1
    in_kubernetes: bool = False
    sources: tuple[tuple[str, str], ...] = ()

    def peer_hostname(self, ordinal: int) -> str:
        """Hostname of the pod with ``ordinal`` in this pod's workload (``w-10`` for 10, not ``w-9``)."""
        if self.name_prefix is None or self.workload is None:
            raise ValueError(
                f"pod {self.hostname!r}: no ordinal pattern in the hostname, so peers cannot be named; "
                "run as a StatefulSet, indexed Job or JobSet pod (hostname <name>-<n>)"
            )
        if self.workload == "jobset":
            return (
                f"{self.name_prefix}-{ordinal // self.pods_per_job}-{ordinal % self.pods_per_job}"
            )
        if self.workload == "pytorchjob":
            return (
                f"{self.name_prefix}-master-0"
                if ordinal == 0
                else f"{self.name_prefix}-worker-{ordinal - 1}"
            )
        return f"{self.name_prefix}-{ordinal}"

    def peer_fqdn(self, ordinal: int, service: str | None = None) -> str:
        """``<peer hostname>.<service>.<namespace>.svc.<zone>``; ``service`` defaults to the subdomain."""
        service = service or self.subdomain
        if not service:
            raise ValueError(
                f"pod {self.hostname!r} has no subdomain and no service was given; set spec.subdomain "
                "(StatefulSet: serviceName) to the headless Service, or pass the service explicitly"
            )
        return f"{self.peer_hostname(ordinal)}.{service_fqdn(service, self.namespace, self.cluster_domain)}"

    def source_of(self, field_name: str) -> str:
        """Where ``field_name`` was read from (``"POD_IP"``, ``"/etc/hosts"``, ...), or ``"unknown"``."""
        return dict(self.sources).get(field_name, "unknown")

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["sources"] = dict(self.sources)
        return data


def service_fqdn(service: str, namespace: str, cluster_domain: str) -> str:
    """``train`` -> ``train.<ns>.svc.<zone>``; names with a dot are taken as already qualified."""
    service = service.rstrip(".")
    if "." in service:
        return service
    return f"{service}.{namespace}.svc.{cluster_domain}"


_JOBSET_HOST = re.compile(r"^(?P<prefix>.+)-(?P<job>\d+)-(?P<pod>\d+)$")
_TRAILING_NUMBER = re.compile(r"^(?P<prefix>.+)-(?P<n>\d+)$")
_PYTORCHJOB_HOST = re.compile(r"^(?P<prefix>.+)-(?P<role>master|worker)-(?P<n>\d+)$")


def parse_ordinal(
    hostname: str, env: Mapping[str, str]
) -> tuple[str | None, int | None, str | None, int, str]:
    """(workload, ordinal, name prefix, pods per job, how it was found) from hostname and env.

    StatefulSet ``<sts>-<n>``; indexed Job ``<job>-<n>`` with ``JOB_COMPLETION_INDEX=n``; JobSet
    ``<jobset>-<rjob>-<jobidx>-<podidx>`` (ordinal ``jobidx * TRAINKIT_PODS_PER_JOB + podidx``,
    default one pod per Job); Kubeflow ``PET_NODE_RANK``. ``TRAINKIT_WORKLOAD`` forces the kind.
    """
    forced = read_workload(env)
    pods_per_job = read_pods_per_job(env)
    index = env.get("JOB_COMPLETION_INDEX", "").strip()
    jobset = _JOBSET_HOST.match(hostname)
    trailing = _TRAILING_NUMBER.match(hostname)
    kubeflow = _PYTORCHJOB_HOST.match(hostname)

    if forced == "pytorchjob" or (forced is None and env.get("PET_NODE_RANK", "").strip()):
        raw = env.get("PET_NODE_RANK", "").strip()
        if not raw.isdigit():
            raise ValueError(
                f"PET_NODE_RANK={raw!r} is not a non-negative integer (Kubeflow sets it per pod)"
            )
        prefix = kubeflow.group("prefix") if kubeflow else None
        return "pytorchjob", int(raw), prefix, 1, "PET_NODE_RANK"

    looks_jobset = (
        jobset is not None
        and (index == "" or index == jobset.group("pod"))
        and (env.get("JOBSET_NAME", "") != "" or index != "")
    )
    if forced == "jobset" or (forced is None and looks_jobset):
        if jobset is None:
            raise ValueError(
                f"hostname {hostname!r} is not <jobset>-<replicatedjob>-<jobindex>-<podindex>; "
                "unset TRAINKIT_WORKLOAD or fix the pod's hostname"
            )
        job, pod = int(jobset.group("job")), int(jobset.group("pod"))
        if pod >= pods_per_job:
            raise ValueError(
                f"JobSet pod {hostname!r} has pod index {pod} but TRAINKIT_PODS_PER_JOB={pods_per_job}; "
                "set TRAINKIT_PODS_PER_JOB to the replicated Job's parallelism"
            )
        return (
            "jobset",
            job * pods_per_job + pod,
            jobset.group("prefix"),
            pods_per_job,
            "hostname (JobSet)",
        )

    if forced == "indexed-job" or (forced is None and index != ""):
        if not index.isdigit():
            raise ValueError(f"JOB_COMPLETION_INDEX={index!r} is not a non-negative integer")
        suffix = f"-{index}"
        prefix = hostname[: -len(suffix)] if hostname.endswith(suffix) else None
        if prefix is None and trailing is not None and forced == "indexed-job":
            prefix = trailing.group("prefix")
        return "indexed-job", int(index), prefix, 1, "JOB_COMPLETION_INDEX"

    if forced == "statefulset" or (forced is None and trailing is not None):
        if trailing is None:
            raise ValueError(f"hostname {hostname!r} is not <statefulset>-<ordinal>")
        return (
            "statefulset",
            int(trailing.group("n")),
            trailing.group("prefix"),
            1,
            "hostname (StatefulSet)",
        )
    return None, None, None, 1, "none"


def running_in_kubernetes(env: Mapping[str, str] | None = None) -> bool:
    """True inside a Kubernetes pod; the one answer everyone uses (default env: ``os.environ``)."""
    env = os.environ if env is None else env
    return env.get(IN_KUBERNETES_VARIABLE, "") != ""


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _search_domains(resolv_conf: str | None) -> list[str]:
    domains: list[str] = []
    for line in (resolv_conf or "").splitlines():
        fields = line.split()
        if fields and fields[0] in {"search", "domain"}:
            domains.extend(name.rstrip(".") for name in fields[1:])
    return domains


def _zone_and_namespace(domains: list[str]) -> tuple[str | None, str | None]:
    """Kubernetes writes ``search <ns>.svc.<zone> svc.<zone> <zone>``; read both from it."""
    for domain in domains:
        labels = domain.split(".")
        if len(labels) >= 3 and labels[1] == "svc":
            return ".".join(labels[2:]), labels[0]
    for domain in domains:
        if domain.startswith("svc."):
            return domain[len("svc.") :], None
    return None, None


def _hosts_entry(hosts: str | None, hostname: str) -> tuple[str | None, str | None]:
    """(IP, FQDN) of this pod's own line in /etc/hosts: kubelet writes ``<ip> <host>.<sub>.<ns>.svc.<zone> <host>``."""
    for line in (hosts or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        names = fields[1:]
        fqdn = next((n for n in names if n.startswith(f"{hostname}.") and ".svc." in n), None)
        if fqdn is not None or hostname in names:
            address = fields[0]
            if _is_loopback(address):
                continue
            return address, fqdn
    return None, None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def read_pod_identity(
    env: Mapping[str, str] | None = None,
    *,
    hostname: str | None = None,
    files: PodFiles | None = None,
) -> PodIdentity:
    """Read this pod's identity; ``env``, ``hostname`` and ``files`` default to the real ones.

    Precedence: downward-API variables (``POD_NAME``, ``POD_NAMESPACE``, ``POD_IP``) win, then
    /etc/hosts (kubelet's line for the pod FQDN), the service-account namespace file, and
    /etc/resolv.conf's search list; ``TRAINKIT_CLUSTER_DOMAIN`` overrides the zone.
    """
    env = os.environ if env is None else env
    files = files or PodFiles()
    hostname = hostname or socket.gethostname()
    sources: dict[str, str] = {"hostname": "gethostname()"}
    domains = _search_domains(_read_text(files.resolv_conf))
    zone, search_namespace = _zone_and_namespace(domains)
    hosts_ip, fqdn = _hosts_entry(_read_text(files.hosts), hostname)

    subdomain: str | None = None
    fqdn_namespace = fqdn_zone = None
    if fqdn is not None:
        labels = fqdn.split(".")
        # <host>.<subdomain>.<ns>.svc.<zone>
        if len(labels) >= 5 and labels[3] == "svc":
            subdomain, fqdn_namespace, fqdn_zone = labels[1], labels[2], ".".join(labels[4:])
            sources["subdomain"] = files.hosts
    if subdomain is None:
        subdomain = read_subdomain(env)
        if subdomain is not None:
            sources["subdomain"] = SUBDOMAIN_VARIABLE

    namespace_file = (_read_text(files.namespace) or "").strip() or None
    namespace = None
    for name, value in (
        ("POD_NAMESPACE", env.get("POD_NAMESPACE", "").strip() or None),
        (files.namespace, namespace_file),
        (files.hosts, fqdn_namespace),
        (f"{files.resolv_conf} search", search_namespace),
    ):
        if value:
            namespace, sources["namespace"] = value, name
            break
    if namespace is None:
        namespace, sources["namespace"] = "default", "default"

    cluster_domain = None
    for name, value in (
        (CLUSTER_DOMAIN_VARIABLE, read_cluster_domain(env)),
        (f"{files.resolv_conf} search", zone),
        (files.hosts, fqdn_zone),
    ):
        if value:
            cluster_domain, sources["cluster_domain"] = value.rstrip("."), name
            break
    if cluster_domain is None:
        cluster_domain, sources["cluster_domain"] = DEFAULT_CLUSTER_DOMAIN, "default"

    pod_ip = env.get("POD_IP", "").strip() or None
    if pod_ip is not None:
        sources["pod_ip"] = "POD_IP"
    elif hosts_ip is not None:
        pod_ip, sources["pod_ip"] = hosts_ip, files.hosts
    if pod_ip is not None:
        try:
            pod_ip = str(ipaddress.ip_address(pod_ip))
        except ValueError:
            raise ValueError(
                f"{sources['pod_ip']}: {pod_ip!r} is not an IP address; set POD_IP from the downward "
                "API (fieldRef: status.podIP)"
            ) from None

    workload, ordinal, prefix, pods_per_job, how = parse_ordinal(hostname, env)
    sources["ordinal"] = how
    pod_name = env.get("POD_NAME", "").strip() or None
    return PodIdentity(
        hostname=hostname,
        subdomain=subdomain,
        namespace=namespace,
        cluster_domain=cluster_domain,
        pod_name=pod_name,
        pod_ip=pod_ip,
        workload=workload,
        ordinal=ordinal,
        name_prefix=prefix,
        pods_per_job=pods_per_job,
        in_kubernetes=running_in_kubernetes(env),
        sources=tuple(sorted(sources.items())),
    )
