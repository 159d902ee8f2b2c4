"""Pod defaults for ``trainkit-run``: in a pod of a multi-pod job, use the ``k8s`` rendezvous.

Rewrites only options the user did not give (on the command line or as ``PET_*``); explicit
rendezvous flags, or nothing saying there is more than one node, switch the defaults off entirely
(the launch is then torchrun's). Never reads the Kubernetes API.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from trainkit.env_vars import (
    DEFAULT_RDZV_PORT,
    NNODES_VARIABLE,
    SERVICE_VARIABLE,
    NodeCount,
    parse_nnodes,
    read_nnodes,
    read_rdzv_port,
    read_rdzv_store,
    read_run_id,
    read_service,
)
from trainkit.k8s.identity import read_pod_identity, running_in_kubernetes

__all__ = ["DEFAULT_RDZV_PORT", "RENDEZVOUS_OPTIONS", "apply_pod_defaults", "requested_node_count"]

#: Any of these given explicitly means the user chose the rendezvous: pod defaults stay off.
RENDEZVOUS_OPTIONS = frozenset(
    {"rdzv_backend", "rdzv_endpoint", "master_addr", "master_port", "node_rank", "standalone"}
)


def requested_node_count(
    args: argparse.Namespace, explicit: set[str], env: Mapping[str, str]
) -> tuple[NodeCount | None, str]:
    """The job's node count and where it came from, or ``(None, "")`` when nothing says.

    ``--nnodes`` (or ``PET_NNODES``, torchrun's own default for it) when explicit, else
    ``TRAINKIT_NNODES``. torchrun's default of one node is not a request.
    """
    if "nnodes" in explicit:
        return parse_nnodes(str(args.nnodes), "--nnodes"), "--nnodes"
    count = read_nnodes(env)
    return (None, "") if count is None else (count, NNODES_VARIABLE)


def apply_pod_defaults(
    args: argparse.Namespace, explicit: set[str], env: Mapping[str, str]
) -> list[str]:
    """Inside a pod, point the launcher at the ``k8s`` rendezvous; returns one line per decision.

    Applies inside a pod (``trainkit.k8s.identity.running_in_kubernetes``) when none of
    ``RENDEZVOUS_OPTIONS`` is explicit, the node count (``requested_node_count``) allows more than
    one node (``N > 1`` or ``MIN:MAX`` with ``MAX > 1``) and a headless Service is known
    (``args.service``, ``TRAINKIT_SERVICE`` or the pod's subdomain). A one-node launch stays
    torchrun's, as in any pod without a Service.
    Sets ``rdzv_backend="k8s"``, ``rdzv_endpoint="<service>:<TRAINKIT_RDZV_PORT or 29400>"``,
    ``nnodes`` from ``TRAINKIT_NNODES``, ``local_addr`` from the pod IP (``POD_IP``, else
    kubelet's /etc/hosts line), ``rdzv_id`` from ``TRAINKIT_RUN_ID`` and, with
    ``TRAINKIT_RDZV_STORE``, ``rdzv_conf`` ``store_service=<it>``; each only when not explicit.
    Pod facts come from ``read_pod_identity``. Raises ``ValueError`` for a malformed variable,
    naming it, whether or not the defaults apply.
    """
    if not running_in_kubernetes(env):
        return []
    chosen = sorted(RENDEZVOUS_OPTIONS & explicit)
    if chosen:
        flags = ", ".join("--" + name.replace("_", "-") for name in chosen)
        return [f"pod defaults off: rendezvous chosen explicitly ({flags})"]

    identity = read_pod_identity(env)
    port = read_rdzv_port(env)
    node_count, count_source = requested_node_count(args, explicit, env)
    if node_count is None or node_count.max_nodes == 1:
        said = f"{count_source} says {node_count}" if node_count else "no node count given"
        note = (
            f"pod defaults off: one node ({said}), launched as torchrun would; for a job of "
            f"several pods set {NNODES_VARIABLE} (or --nnodes) to their number, e.g. 4 or 1:8"
        )
        if identity.ordinal:
            note += f" (this pod is ordinal {identity.ordinal} of a {identity.workload})"
        return [note]
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

    args.rdzv_backend = "k8s"
    args.rdzv_endpoint = f"{service}:{port}"
    notes = [
        f"--rdzv-backend k8s --rdzv-endpoint {args.rdzv_endpoint} (headless Service from {source})"
    ]

    if "nnodes" not in explicit:
        args.nnodes = str(node_count)
        notes.append(f"--nnodes {args.nnodes} (from {NNODES_VARIABLE})")
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
