"""Checks of the collective variables the user set: prefix matches, wrong GIDs, debug leftovers.

``check_user_settings`` is a pure function of ``PodResources`` and the environment; it only reports
(the plan never replaces what the user set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from trainkit.comms.discovery import PodResources
from trainkit.comms.findings import Finding
from trainkit.comms.rdma import roce_v2_ipv4_gid_index

__all__ = ["DEBUG_VARIABLES", "check_user_settings"]

#: Variables that help debugging and hurt (or flood logs) when left set in production.
DEBUG_VARIABLES: dict[str, Callable[[str], bool]] = {
    "NCCL_DEBUG": lambda value: value.upper() in ("INFO", "TRACE"),
    "NCCL_DEBUG_SUBSYS": lambda value: bool(value),
    "TORCH_DISTRIBUTED_DEBUG": lambda value: value.upper() in ("INFO", "DETAIL"),
    "TORCH_CPP_LOG_LEVEL": lambda value: value.upper() == "INFO",
    "CUDA_LAUNCH_BLOCKING": lambda value: value == "1",
    "NCCL_P2P_DISABLE": lambda value: value == "1",
    "NCCL_SHM_DISABLE": lambda value: value == "1",
    "NCCL_NET_GDR_LEVEL": lambda value: value in ("0", "LOC"),
    "NCCL_ALGO": lambda value: bool(value),
    "NCCL_PROTO": lambda value: bool(value),
    "TORCH_NCCL_BLOCKING_WAIT": lambda value: value == "1",
}


def _hca_list_findings(resources: PodResources, hca_value: str) -> list[Finding]:
    findings = []
    names = [part.split(":")[0] for part in hca_value.lstrip("^").split(",") if part]
    all_names = [hca.name for hca in resources.hcas]
    for name in names:
        also = [other for other in all_names if other != name and other.startswith(name)]
        if also:
            findings.append(
                Finding(
                    "warning",
                    "hca-prefix-match",
                    f"NCCL_IB_HCA={hca_value} matches by prefix: {name} also selects {', '.join(also)}",
                    f"prefix the list with '=' for exact matching: NCCL_IB_HCA=={hca_value.lstrip('^')}",
                )
            )
    unknown = [name for name in names if not any(other.startswith(name) for other in all_names)]
    if unknown and resources.hcas:
        findings.append(
            Finding(
                "warning",
                "hca-unknown",
                f"NCCL_IB_HCA names {', '.join(unknown)}, not on this node "
                f"(have: {', '.join(all_names)})",
                "fix or unset NCCL_IB_HCA",
            )
        )
    return findings


def _gid_index_findings(resources: PodResources, index: int) -> list[Finding]:
    findings = []
    for hca in resources.hcas:
        for port in hca.active_ports:
            if port.link_layer != "Ethernet":
                continue
            gid = next((g for g in port.gids if g.index == index), None)
            if gid is None or gid.type.lower() != "roce v2" or not gid.is_ipv4_mapped:
                found = f"{gid.type or 'untyped'} {gid.gid}" if gid else "an empty slot"
                good = roce_v2_ipv4_gid_index(port)
                findings.append(
                    Finding(
                        "warning",
                        "gid-index",
                        f"NCCL_IB_GID_INDEX={index} is {found} on {hca.name} port {port.number}, "
                        "not a RoCE v2 IPv4 GID",
                        f"use NCCL_IB_GID_INDEX={good}" if good is not None else "unset it",
                    )
                )
                break
    return findings


def check_user_settings(
    resources: PodResources, env: Mapping[str, str], rdma_usable: bool
) -> list[Finding]:
    """Findings about collective variables set in ``env``, judged against what the pod has."""
    findings = []
    hca_value = env.get("NCCL_IB_HCA", "")
    if hca_value and not hca_value.startswith(("=", "^=")):
        findings.extend(_hca_list_findings(resources, hca_value))
    gid_value = env.get("NCCL_IB_GID_INDEX", "")
    if gid_value.lstrip("-").isdigit() and int(gid_value) >= 0:
        findings.extend(_gid_index_findings(resources, int(gid_value)))
    if env.get("NCCL_IB_DISABLE") == "1" and rdma_usable:
        findings.append(
            Finding(
                "warning",
                "ib-disabled",
                "NCCL_IB_DISABLE=1 forces TCP although RDMA is usable",
                "unset NCCL_IB_DISABLE",
            )
        )
    for name, is_debug in DEBUG_VARIABLES.items():
        value = env.get(name)
        if value is not None and is_debug(value):
            findings.append(
                Finding(
                    "warning",
                    "debug-variable",
                    f"{name}={value} is a debugging setting left on "
                    "(slower or noisy in production)",
                    f"unset {name} outside debugging sessions",
                )
            )
    return findings
