"""Cloud and fabric profiles: what a platform's own files or devices say collectives need.

Each profile is a pure function of ``PodResources`` that returns ``None`` when it does not apply;
its variables get provenance "platform" in the plan. Profiles never read the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainkit.comms.discovery import PodResources
from trainkit.comms.findings import Finding, Proposal

__all__ = ["PROFILES", "ProfileResult"]


@dataclass(frozen=True)
class ProfileResult:
    settings: tuple[Proposal, ...]
    transport: str | None  # overrides the generic transport decision when not None
    findings: tuple[Finding, ...] = ()
    skip_generic_rdma: bool = False


def _profile_aws_efa(resources: PodResources) -> ProfileResult | None:
    efa = [hca for hca in resources.hcas if hca.driver == "efa"]
    if not efa and "aws_efa" not in resources.platform_files:
        return None
    if not efa:
        # The image carries the EFA software but the pod was given no EFA device.
        missing = Finding(
            "warning",
            "efa-not-given",
            "the image has the EFA software (/opt/amazon/efa) but no EFA device is visible",
            "request vpc.amazonaws.com/efa in the container's resources on an EFA instance type",
        )
        return ProfileResult(settings=(), transport=None, findings=(missing,))
    findings = []
    if not resources.nccl_net_plugin:
        findings.append(
            Finding(
                "error",
                "efa-no-plugin",
                f"{len(efa)} EFA device(s) but no NCCL net plugin (libnccl-net.so of aws-ofi-nccl) "
                "on the library path: NCCL will use TCP sockets",
                "use an image with aws-ofi-nccl installed (AWS Deep Learning Containers, or the EFA "
                "installer with --enable-ofi-nccl) and put its lib directory on LD_LIBRARY_PATH",
            )
        )
    usable = bool(efa) and bool(resources.nccl_net_plugin) and "efa" in resources.verbs_providers
    if efa and resources.nccl_net_plugin and "efa" not in resources.verbs_providers:
        findings.append(
            Finding(
                "error",
                "no-verbs-provider",
                "EFA devices but no libefa verbs provider in the image",
                "install the EFA user-space libraries (EFA installer) in the image",
            )
        )
    settings = (
        Proposal(
            "FI_PROVIDER", "efa", "AWS EFA: libfabric's efa provider under the aws-ofi-nccl plugin"
        ),
    )
    # FI_EFA_USE_DEVICE_RDMA is left to libfabric: it enables RDMA reads where the instance has
    # them, and forcing it on an instance without them makes the provider fail to open.
    return ProfileResult(
        settings=settings,
        transport="efa" if usable else "tcp",
        findings=tuple(findings),
        skip_generic_rdma=True,
    )


def _profile_gcp_gib(resources: PodResources) -> ProfileResult | None:
    values = resources.platform_env.get("gcp_gib_env")
    if values is None:
        return None
    path = resources.platform_files.get("gcp_gib_env", "")
    return ProfileResult(
        settings=tuple(
            Proposal(name, value, f"from the platform's {path}") for name, value in values.items()
        ),
        transport=None,
    )


def _profile_nccl_conf(resources: PodResources) -> ProfileResult | None:
    values = resources.platform_env.get("nccl_conf")
    if not values:
        return None
    path = resources.platform_files.get("nccl_conf", "")
    return ProfileResult(
        settings=tuple(
            Proposal(name, value, f"from {path} (NCCL reads it too)")
            for name, value in values.items()
        ),
        transport=None,
    )


def _profile_azure_nd(resources: PodResources) -> ProfileResult | None:
    path = resources.platform_files.get("azure_topology") or resources.platform_files.get(
        "azure_topology_v4"
    )
    if not path:
        return None
    return ProfileResult(
        settings=(
            Proposal(
                "NCCL_TOPO_FILE", path, "Azure ND: the VM's PCIe topology, hidden from the guest"
            ),
        ),
        transport=None,
    )


#: Profiles by name, tried in order; each returns None when it does not apply to the pod.
PROFILES: dict[str, Callable[[PodResources], ProfileResult | None]] = {
    "aws-efa": _profile_aws_efa,
    "gcp-gib": _profile_gcp_gib,
    "azure-nd": _profile_azure_nd,
    "nccl-conf": _profile_nccl_conf,
}
