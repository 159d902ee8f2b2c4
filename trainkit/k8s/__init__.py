"""Kubernetes knowledge: pod identity, headless-Service discovery and the ``k8s`` rendezvous backend.

Importing this package never imports torch; the rendezvous handler does when torchrun creates it.
"""

from trainkit.k8s.dns import (
    DiscoveryError,
    DiscoveryTimeoutError,
    resolve_headless_service,
    wait_for_name,
)
from trainkit.k8s.identity import PodIdentity, read_pod_identity, service_fqdn

__all__ = [
    "DiscoveryError",
    "DiscoveryTimeoutError",
    "PodIdentity",
    "read_pod_identity",
    "resolve_headless_service",
    "service_fqdn",
    "wait_for_name",
]
