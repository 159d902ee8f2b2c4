"""The collective-communication plan: NCCL/torch variables derived from what the pod was given.

``build_plan`` is a pure function of ``PodResources`` and the environment that combines the
platform profiles, the RDMA selection and the user-setting checks: each variable carries its
provenance (user, platform, detected) and a reason, and a variable the user set is never replaced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from trainkit.comms.discovery import PodResources
from trainkit.comms.findings import Finding, format_bytes
from trainkit.comms.profiles import PROFILES
from trainkit.comms.rdma import (
    MIN_MEMLOCK_BYTES,
    Affinity,
    RdmaSelection,
    gpu_hca_affinity,
    select_rdma,
)
from trainkit.comms.user_checks import DEBUG_VARIABLES, check_user_settings
from trainkit.env_vars import REQUIRE_RDMA_VARIABLE, read_require_rdma

__all__ = [
    "DEBUG_VARIABLES",
    "MIN_MEMLOCK_BYTES",
    "MIN_SHM_BYTES",
    "PROFILES",
    "Affinity",
    "Finding",
    "Plan",
    "Setting",
    "build_plan",
]

#: /dev/shm below this starves NCCL's shared-memory transport and DataLoader workers (64 MiB default).
MIN_SHM_BYTES = 1 << 30

# Variables a user sets to steer collectives; shown with provenance "user" in the plan.
_USER_PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_", "GLOO_SOCKET_IFNAME", "UCX_")
_SOURCES = ("user", "platform", "detected")


@dataclass(frozen=True)
class Setting:
    name: str
    value: str
    source: str  # "user", "platform" (a profile or vendor file) or "detected"
    reason: str

    def __post_init__(self) -> None:
        assert self.source in _SOURCES, self.source


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What trainkit will export for collectives, why, and what is wrong with the pod."""

    transport: str  # "infiniband", "roce", "efa", "platform" or "tcp"
    profile: str  # "generic" or a name in PROFILES
    hcas: tuple[str, ...]  # "mlx5_0:1" entries NCCL may use
    settings: tuple[Setting, ...]
    findings: tuple[Finding, ...]
    affinity: tuple[Affinity, ...] = ()

    @property
    def rdma_usable(self) -> bool:
        return self.transport != "tcp"

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == "error")

    def to_export(self) -> dict[str, str]:
        """Variables trainkit sets: everything not already set by the user."""
        return {s.name: s.value for s in self.settings if s.source != "user"}

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["rdma_usable"] = self.rdma_usable
        return data

    def format(self) -> str:
        """The plan as a short human report (one line per variable and finding)."""
        lines = [f"transport: {self.transport}  (profile: {self.profile})"]
        if self.hcas:
            lines.append(f"HCAs: {', '.join(self.hcas)}")
        width = min(max((len(s.name) + len(s.value) for s in self.settings), default=0) + 1, 36)
        for s in self.settings:
            lines.append(f"  {(s.name + '=' + s.value).ljust(width)}  [{s.source}] {s.reason}")
        for start in range(0, len(self.affinity), 4):
            pairs = [f"GPU{a.gpu}->{a.hca} {a.link}" for a in self.affinity[start : start + 4]]
            lines.append(("GPU/HCA: " if start == 0 else "         ") + ", ".join(pairs))
        for f in self.findings:
            lines.append(f"{f.severity.upper():7} [{f.code}] {f.message}")
            if f.fix:
                lines.append(f"        fix: {f.fix}")
        return "\n".join(lines)


def _socket_interface(resources: PodResources) -> tuple[str, str] | None:
    default = [a.interface for a in resources.network_status if a.default and a.interface]
    if default:
        return default[0], "the pod network interface (Multus default network)"
    if resources.default_route_interface:
        return (
            resources.default_route_interface,
            "the interface of the default route (the pod network)",
        )
    return None


def _set_by_torchrun(name: str, env: Mapping[str, str]) -> bool:
    # torchrun (and trainkit-run) give every worker TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless set.
    return (
        name == "TORCH_NCCL_ASYNC_ERROR_HANDLING"
        and "TORCHELASTIC_RUN_ID" in env
        and env.get(name) == "1"
    )


def _pod_findings(resources: PodResources, affinity: tuple[Affinity, ...]) -> list[Finding]:
    """What the pod lacks whatever the transport: GPUs, /dev/shm, HCAs near the GPUs."""
    findings = []
    if not resources.gpus:
        findings.append(
            Finding(
                "warning",
                "no-gpu",
                "no GPU visible (/dev/nvidia<N>): collectives run on CPU with gloo",
                "request nvidia.com/gpu in the container's resources if this pod should have GPUs",
            )
        )
    if resources.shm_bytes is not None and resources.shm_bytes < MIN_SHM_BYTES:
        findings.append(
            Finding(
                "warning",
                "shm",
                f"/dev/shm is {format_bytes(resources.shm_bytes)}: NCCL's shared-memory transport "
                "and DataLoader workers run out of it",
                "mount an emptyDir with medium: Memory (sizeLimit of a few GiB) at /dev/shm",
            )
        )
    cross = [f"GPU{a.gpu}" for a in affinity if not a.same_numa]
    if cross:
        findings.append(
            Finding(
                "warning" if len(cross) == len(affinity) else "info",
                "cross-numa",
                f"{', '.join(cross)}: no given HCA on the same NUMA node, so GPUDirect RDMA "
                "traffic crosses the inter-socket link",
                "ask for HCAs on the GPUs' NUMA nodes (topology-aware scheduling)",
            )
        )
    return findings


def _with_provenance(
    candidates: dict[str, Setting], env: Mapping[str, str], ours: set[str]
) -> tuple[Setting, ...]:
    """The candidates, each replaced by what the user set where they did, then the user's others."""
    settings: list[Setting] = []
    for name, setting in candidates.items():
        if _set_by_torchrun(name, env) and name not in ours:
            settings.append(
                Setting(
                    name, env[name], "platform", "torchrun's default for its workers (same value)"
                )
            )
        elif name in env and name not in ours:
            settings.append(
                Setting(name, env[name], "user", f"set by the user (trainkit: {setting.value})")
            )
        else:
            settings.append(setting)
    for name in sorted(env):
        if name.startswith(_USER_PREFIXES) and name not in candidates and name not in ours:
            settings.append(Setting(name, env[name], "user", "set by the user"))
    return tuple(settings)


def build_plan(
    resources: PodResources,
    env: Mapping[str, str],
    *,
    ours: Iterable[str] = (),
) -> Plan:
    """Compute the plan. ``ours`` names variables a previous ``apply_plan`` set (not the user's).

    Raises ``ValueError`` when ``TRAINKIT_REQUIRE_RDMA`` is neither 0 nor 1.
    """
    findings: list[Finding] = []
    candidates: dict[str, Setting] = {}

    def propose(name: str, value: str, source: str, reason: str) -> None:
        if name not in candidates:  # earlier proposals win: platform before detected
            candidates[name] = Setting(name, value, source, reason)

    profile_name = "generic"
    transport_override: str | None = None
    skip_generic = False
    for name, detect in PROFILES.items():
        result = detect(resources)
        if result is None:
            continue
        if profile_name == "generic" and (result.settings or result.transport):
            profile_name = name
        for proposal in result.settings:
            propose(proposal.name, proposal.value, "platform", proposal.reason)
        findings.extend(result.findings)
        transport_override = transport_override or result.transport
        skip_generic = skip_generic or result.skip_generic_rdma

    if skip_generic:
        rdma = RdmaSelection(transport=transport_override or "tcp")
    else:
        rdma = select_rdma(resources)
        findings.extend(rdma.findings)
        for proposal in rdma.settings:
            propose(proposal.name, proposal.value, "detected", proposal.reason)
    transport = rdma.transport
    if transport == "tcp":
        why = "; ".join(f.code for f in findings if f.severity == "error") or "no RDMA devices"
        propose(
            "NCCL_IB_DISABLE", "1", "detected", f"RDMA is unusable here ({why}): use TCP sockets"
        )
    interface = _socket_interface(resources)
    if interface:
        propose(
            "NCCL_SOCKET_IFNAME",
            "=" + interface[0],
            "detected",
            f"bootstrap/socket traffic on {interface[1]}, exact match",
        )
    propose(
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "1",
        "detected",
        "a failed or timed-out collective ends the process so the launcher restarts the group",
    )

    affinity = gpu_hca_affinity(resources, rdma.selected)
    findings.extend(_pod_findings(resources, affinity))
    findings.extend(check_user_settings(resources, env, transport != "tcp"))
    if read_require_rdma(env) and transport == "tcp":
        findings.append(
            Finding(
                "error",
                "require-rdma",
                f"{REQUIRE_RDMA_VARIABLE}=1 but the plan falls back to TCP",
                f"fix the errors above, or unset {REQUIRE_RDMA_VARIABLE} to accept TCP",
            )
        )
    return Plan(
        transport=transport,
        profile=profile_name,
        hcas=rdma.hcas,
        settings=_with_provenance(candidates, env, set(ours)),
        findings=tuple(findings),
        affinity=affinity,
    )
