"""Pod defaults for ``trainkit-run``: inside a pod with a headless Service, use the ``k8s`` rendezvous.

Rewrites only options the user did not give (on the command line or as ``PET_*``); explicit
rendezvous flags switch the defaults off entirely. Never reads the Kubernetes API.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from trainkit.env_vars import (
    DEFAULT_RDZV_PORT,
    SERVICE_VARIABLE,
    read_nnodes,
    read_rdzv_port,
    read_rdzv_store,
    read_run_id,
    read_service,
)
from trainkit.k8s.identity import read_pod_identity, running_in_kubernetes

__all__ = ["DEFAULT_RDZV_PORT", "RENDEZVOUS_OPTIONS", "apply_pod_defaults"]

#: Any of these given explicitly means the user chose the rendezvous: pod defaults stay off.
RENDEZVOUS_OPTIONS = frozenset(
    {"rdzv_backend", "rdzv_endpoint", "master_addr", "master_port", "node_rank", "standalone"}
)


def apply_pod_defaults(
    args: argparse.Namespace, explicit: set[str], env: Mapping[str, str]
) -> list[str]:
    """Inside a pod, point the launcher at the ``k8s`` rendezvous; returns one line per decision.

    Applies inside a pod (``trainkit.k8s.identity.running_in_kubernetes``) when a headless Service
    is known (``args.service``, ``TRAINKIT_SERVICE`` or the pod's subdomain) and none of
    ``RENDEZVOUS_OPTIONS`` is explicit.
    Sets ``rdzv_backend="k8s"``, ``rdzv_endpoint="<service>:<TRAINKIT_RDZV_PORT or 29400>"``,
    ``nnodes`` from ``TRAINKIT_NNODES`` (``PET_NNODES`` is already torchrun's own default),
    ``local_addr`` from the pod IP (``POD_IP``, else kubelet's /etc/hosts line), ``rdzv_id`` from ``TRAINKIT_RUN_ID`` and, with
    ``TRAINKIT_RDZV_STORE``, ``rdzv_conf`` ``store_service=<it>``; each only when not explicit.
    Pod facts come from ``read_pod_identity``. Raises ``ValueError`` for a malformed variable,
    naming it.
    """
    if not running_in_kubernetes(env):
        return []
    chosen = sorted(RENDEZVOUS_OPTIONS & explicit)
    if chosen:
        flags = ", ".join("--" + name.replace("_", "-") for name in chosen)
        return [f"pod defaults off: rendezvous chosen explicitly ({flags})"]

    identity = read_pod_identity(env)
    service = getattr(args, "service", None)
    source = "--service"
    if not service and read_service(env) is not None:
        service, source = read_service(env), SERVICE_VARIABLE
    if not service:
        service, source = identity.subdomain, "the pod's subdomain"
    if not service:
        return [
            "pod defaults off: no headless Service known; set spec.subdomain, TRAINKIT_SERVICE or "
            "--service to use the k8s rendezvous"
        ]

    port = read_rdzv_port(env)
    args.rdzv_backend = "k8s"
    args.rdzv_endpoint = f"{service}:{port}"
    notes = [
        f"--rdzv-backend k8s --rdzv-endpoint {args.rdzv_endpoint} (headless Service from {source})"
    ]

    if "nnodes" not in explicit:
        node_count = read_nnodes(env)
        if node_count is not None:
            args.nnodes = str(node_count)
            notes.append(f"--nnodes {args.nnodes} (from TRAINKIT_NNODES)")
        else:
            notes.append(
                f"--nnodes {args.nnodes} (default; set TRAINKIT_NNODES to the number of pods, or MIN:MAX)"
            )
    if "local_addr" not in explicit and identity.pod_ip is not None:
        args.local_addr = identity.pod_ip
        notes.append(
            f"--local-addr {args.local_addr} (the pod IP, from {identity.source_of('pod_ip')})"
        )
    if "rdzv_id" not in explicit and read_run_id(env) is not None:
        args.rdzv_id = read_run_id(env)
        notes.append(f"--rdzv-id {args.rdzv_id} (from TRAINKIT_RUN_ID)")
    store = read_rdzv_store(env)
    if store and "rdzv_conf" not in explicit:
        existing = getattr(args, "rdzv_conf", "") or ""
        args.rdzv_conf = ",".join(filter(None, [existing, f"store_service={store}"]))
        notes.append(f"--rdzv-conf {args.rdzv_conf} (store pod from TRAINKIT_RDZV_STORE)")
    return notes
