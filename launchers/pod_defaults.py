"""Pod defaults for ``trainkit-run``: inside a pod with a headless Service, use the ``k8s`` rendezvous.

Rewrites only options the user did not give (on the command line or as ``PET_*``); explicit
rendezvous flags switch the defaults off entirely. Never reads the Kubernetes API.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from trainkit.k8s.identity import read_pod_identity

__all__ = ["RENDEZVOUS_OPTIONS", "apply_pod_defaults"]

#: Any of these given explicitly means the user chose the rendezvous: pod defaults stay off.
RENDEZVOUS_OPTIONS = frozenset(
    {"rdzv_backend", "rdzv_endpoint", "master_addr", "master_port", "node_rank", "standalone"}
)

DEFAULT_RDZV_PORT = 29400


def _nnodes(raw: str, name: str) -> str:
    parts = raw.split(":")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"{name}={raw!r}: expected N or MIN:MAX with positive integers, e.g. 4 or 2:4"
        )
    if len(parts) == 2 and int(parts[0]) > int(parts[1]):
        raise ValueError(f"{name}={raw!r}: the minimum is above the maximum")
    return raw.strip()


def _port(raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"TRAINKIT_RDZV_PORT={raw!r}: expected a port number in 1..65535")
    return int(raw)


def apply_pod_defaults(
    args: argparse.Namespace, explicit: set[str], env: Mapping[str, str]
) -> list[str]:
    """Inside a pod, point the launcher at the ``k8s`` rendezvous; returns one line per decision.

    Applies when ``KUBERNETES_SERVICE_HOST`` is set, a headless Service is known (``args.service``,
    ``TRAINKIT_SERVICE`` or the pod's subdomain) and none of ``RENDEZVOUS_OPTIONS`` is explicit.
    Sets ``rdzv_backend="k8s"``, ``rdzv_endpoint="<service>:<TRAINKIT_RDZV_PORT or 29400>"``,
    ``nnodes`` from ``TRAINKIT_NNODES`` (``PET_NNODES`` is already torchrun's own default),
    ``local_addr`` from ``POD_IP``, ``rdzv_id`` from ``TRAINKIT_RUN_ID`` and, with
    ``TRAINKIT_RDZV_STORE``, ``rdzv_conf`` ``store_service=<it>``; each only when not explicit.
    Raises ``ValueError`` for a malformed variable, naming it.
    """
    if env.get("KUBERNETES_SERVICE_HOST", "") == "":
        return []
    chosen = sorted(RENDEZVOUS_OPTIONS & explicit)
    if chosen:
        flags = ", ".join("--" + name.replace("_", "-") for name in chosen)
        return [f"pod defaults off: rendezvous chosen explicitly ({flags})"]

    service = getattr(args, "service", None)
    source = "--service"
    if not service and env.get("TRAINKIT_SERVICE", "").strip():
        service, source = env["TRAINKIT_SERVICE"].strip(), "TRAINKIT_SERVICE"
    if not service:
        identity = read_pod_identity(env)
        service, source = identity.subdomain, "the pod's subdomain"
    if not service:
        return [
            "pod defaults off: no headless Service known; set spec.subdomain, TRAINKIT_SERVICE or "
            "--service to use the k8s rendezvous"
        ]

    port = _port(env.get("TRAINKIT_RDZV_PORT", "").strip() or str(DEFAULT_RDZV_PORT))
    args.rdzv_backend = "k8s"
    args.rdzv_endpoint = f"{service}:{port}"
    notes = [
        f"--rdzv-backend k8s --rdzv-endpoint {args.rdzv_endpoint} (headless Service from {source})"
    ]

    if "nnodes" not in explicit:
        raw = env.get("TRAINKIT_NNODES", "").strip()
        if raw:
            args.nnodes = _nnodes(raw, "TRAINKIT_NNODES")
            notes.append(f"--nnodes {args.nnodes} (from TRAINKIT_NNODES)")
        else:
            notes.append(
                f"--nnodes {args.nnodes} (default; set TRAINKIT_NNODES to the number of pods, or MIN:MAX)"
            )
    if "local_addr" not in explicit and env.get("POD_IP", "").strip():
        args.local_addr = env["POD_IP"].strip()
        notes.append(f"--local-addr {args.local_addr} (from POD_IP)")
    if "rdzv_id" not in explicit and env.get("TRAINKIT_RUN_ID", "").strip():
        args.rdzv_id = env["TRAINKIT_RUN_ID"].strip()
        notes.append(f"--rdzv-id {args.rdzv_id} (from TRAINKIT_RUN_ID)")
    store = env.get("TRAINKIT_RDZV_STORE", "").strip()
    if store and "rdzv_conf" not in explicit:
        existing = getattr(args, "rdzv_conf", "") or ""
        args.rdzv_conf = ",".join(filter(None, [existing, f"store_service={store}"]))
        notes.append(f"--rdzv-conf {args.rdzv_conf} (store pod from TRAINKIT_RDZV_STORE)")
    return notes
