"""Where the pod's metrics are served: the variables, their one parser each, and the defaults.

Pure functions of flags, the environment and the pod identity; nothing here binds, creates files
or starts threads.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

from trainkit.k8s.identity import PodIdentity, read_pod_identity

__all__ = [
    "DEFAULT_POD_METRICS_PORT",
    "METRICS_ADDR_VARIABLE",
    "METRICS_DIR_VARIABLE",
    "METRICS_HOST_VARIABLE",
    "METRICS_PORT_VARIABLE",
    "parse_metrics_port",
    "resolve_metrics_host",
    "resolve_metrics_port",
]

#: Set by trainkit-run for its workers: the directory of slots that the agent's exporter reads.
METRICS_DIR_VARIABLE = "TRAINKIT_METRICS_DIR"
#: The pod's metrics port; without trainkit-run, local rank 0 serves it (0 or unset: disabled).
METRICS_PORT_VARIABLE = "TRAINKIT_METRICS_PORT"
#: The address ``/metrics`` listens on (default: the pod IP in a pod, loopback elsewhere).
METRICS_HOST_VARIABLE = "TRAINKIT_METRICS_HOST"
#: The former name of ``TRAINKIT_METRICS_HOST``, still read when the new one is unset.
METRICS_ADDR_VARIABLE = "TRAINKIT_METRICS_ADDR"
#: The port used inside a Kubernetes pod when neither ``--metrics-port`` nor the variable is set.
DEFAULT_POD_METRICS_PORT = 9400

_LOOPBACK = "127.0.0.1"


def parse_metrics_port(env: Mapping[str, str]) -> int:
    """``TRAINKIT_METRICS_PORT`` as a port, 0 (off) when unset or empty."""
    raw = env.get(METRICS_PORT_VARIABLE, "").strip()
    if raw == "":
        return 0
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(
            f"{METRICS_PORT_VARIABLE}={raw!r} is not a port number; set 1..65535, or 0 to disable metrics"
        ) from None
    if not 0 <= port < 65536:
        raise ValueError(
            f"{METRICS_PORT_VARIABLE}={raw!r} must be in 0..65535 (0 disables metrics)"
        )
    return port


def resolve_metrics_port(
    flag: int | None,
    env: Mapping[str, str] | None = None,
    *,
    identity: PodIdentity | None = None,
) -> int:
    """The port to serve on, 0 meaning off: ``--metrics-port`` if given, else
    ``TRAINKIT_METRICS_PORT``, else 9400 inside a Kubernetes pod and 0 (off) elsewhere.

    Off outside Kubernetes by default so that several jobs on one machine never fight over a port.
    ``identity`` (default: ``read_pod_identity(env)``) says whether this is a pod.
    """
    env = os.environ if env is None else env
    if flag is not None:
        if not 0 <= flag < 65536:
            raise ValueError(f"--metrics-port {flag}: must be in 0..65535 (0 disables metrics)")
        return flag
    if env.get(METRICS_PORT_VARIABLE, "").strip() != "":
        return parse_metrics_port(env)
    identity = identity or read_pod_identity(env)
    return DEFAULT_POD_METRICS_PORT if identity.in_kubernetes else 0


def resolve_metrics_host(
    flag: str | None,
    env: Mapping[str, str] | None = None,
    *,
    identity: PodIdentity | None = None,
) -> str:
    """The address to listen on: ``--metrics-host`` if given, else ``TRAINKIT_METRICS_HOST`` (or
    its former name ``TRAINKIT_METRICS_ADDR``), else the pod IP inside a pod, else 127.0.0.1.

    Never all interfaces unless asked (``0.0.0.0`` or ``::``): a pod's scraper reaches the pod IP,
    and other networks the pod is attached to have no business with the endpoint. A pod whose IP
    is unknown (no ``POD_IP``, no /etc/hosts line) gets loopback; set one of the two.
    """
    env = os.environ if env is None else env
    for source, raw in (
        ("--metrics-host", flag),
        (METRICS_HOST_VARIABLE, env.get(METRICS_HOST_VARIABLE)),
        (METRICS_ADDR_VARIABLE, env.get(METRICS_ADDR_VARIABLE)),
    ):
        if raw is not None and raw.strip() != "":
            return _ip_literal(source, raw.strip())
    identity = identity or read_pod_identity(env)
    if identity.in_kubernetes and identity.pod_ip is not None:
        return identity.pod_ip
    return _LOOPBACK


def _ip_literal(source: str, raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError(
            f"{source}={raw!r} is not an IP address; give the address to listen on (the pod IP, "
            "127.0.0.1, or 0.0.0.0 for every interface)"
        ) from None
