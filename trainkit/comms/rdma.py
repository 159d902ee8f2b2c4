"""RDMA selection: which of the pod's verbs-capable HCAs and ports NCCL may use, and GPU/HCA affinity.

``select_rdma`` is a pure function of ``PodResources`` returning a frozen ``RdmaSelection``; it
covers InfiniBand and RoCE through the verbs provider (EFA is the ``aws-efa`` profile's business).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from trainkit.comms.discovery import Hca, PodResources, Port, natural_key, pci_distance
from trainkit.comms.findings import Finding, Proposal, format_bytes

__all__ = [
    "MIN_MEMLOCK_BYTES",
    "Affinity",
    "RdmaSelection",
    "gpu_hca_affinity",
    "roce_v2_ipv4_gid_index",
    "select_rdma",
]

#: A finite memlock limit below this (without CAP_IPC_LOCK) cannot register NCCL's buffers.
MIN_MEMLOCK_BYTES = 1 << 30

# Kernel driver of an HCA's PCI function -> rdma-core provider library that drives it.
_PROVIDER_OF_DRIVER = {
    "mlx5_core": "mlx5",
    "mlx4_core": "mlx4",
    "efa": "efa",
    "irdma": "irdma",
    "bnxt_en": "bnxt_re",
    "qede": "qedr",
    "rdma_rxe": "rxe",
}


@dataclass(frozen=True, kw_only=True)
class RdmaSelection:
    """The outcome of ``select_rdma``.

    ``transport`` is ``"infiniband"``, ``"roce"``, ``"infiniband+roce"`` or ``"tcp"`` (then
    ``hcas``, ``settings`` and ``selected`` are empty); ``hcas`` are ``mlx5_0:1`` entries for
    ``NCCL_IB_HCA``; ``selected`` the HCAs those ports belong to; ``findings`` say what was left out.
    """

    transport: str
    hcas: tuple[str, ...] = ()
    settings: tuple[Proposal, ...] = ()
    selected: tuple[Hca, ...] = ()
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class Affinity:
    """A GPU and its nearest given HCA; ``link`` uses ``nvidia-smi topo -m``'s names."""

    gpu: int
    gpu_pci: str
    hca: str
    pci_hops: int
    same_numa: bool
    link: str  # PIX (one PCIe switch), PXB (several bridges), PHB (host bridge), NODE, SYS


def roce_v2_ipv4_gid_index(port: Port) -> int | None:
    for gid in port.gids:
        if gid.type.strip().lower() == "roce v2" and gid.is_ipv4_mapped:
            return gid.index
    return None


def _given_hcas(resources: PodResources, findings: list[Finding]) -> tuple[list[Hca], str]:
    """HCAs this pod was given, and how we know: device-plugin PCI lists, then /dev/infiniband."""
    candidates = [hca for hca in resources.hcas if hca.driver != "efa"]
    uverbs = {name for name in resources.dev_infiniband if name.startswith("uverbs")}
    allocated = resources.allocated_pci_addresses
    if allocated:
        given = [hca for hca in candidates if hca.pci_address in allocated]
        sources = sorted(f"PCIDEVICE_{name}" for name in resources.sriov_devices)
        if any(a.pci_address for a in resources.network_status):
            sources.append("the Multus network-status annotation")
        missing = sorted(allocated - {hca.pci_address for hca in given})
        if missing and given:
            findings.append(
                Finding(
                    "warning",
                    "allocated-not-rdma",
                    f"PCI function(s) {', '.join(missing)} named by {' and '.join(sources)} have no "
                    "RDMA device in /sys/class/infiniband",
                    "check the SR-IOV network's resource is an RDMA-capable VF pool (isRdma: true)",
                )
            )
        if given:
            return given, " and ".join(sources)
        # PCI functions of non-RDMA networks only: the RDMA devices come from another plugin.
    if candidates and uverbs:
        return [hca for hca in candidates if hca.uverbs in uverbs], "/dev/infiniband"
    return candidates, "/sys/class/infiniband"


@dataclass
class _Ports:
    """Active, addressable ports of the given HCAs (built up by ``_select_ports``)."""

    entries: list[str] = field(default_factory=list)
    selected: list[Hca] = field(default_factory=list)
    gid_indexes: dict[str, int] = field(default_factory=dict)


def _select_ports(given: list[Hca], resources: PodResources, findings: list[Finding]) -> _Ports:
    ports = _Ports()
    mounted = {name for name in resources.dev_infiniband if name.startswith("uverbs")}
    for hca in given:
        if mounted and hca.uverbs and hca.uverbs not in mounted:
            findings.append(
                Finding(
                    "warning",
                    "uverbs-missing",
                    f"{hca.name} was given to the pod but /dev/infiniband/{hca.uverbs} is not in the "
                    "container; left out of NCCL_IB_HCA",
                    "check the device plugin mounts the VF's verbs device (rdma_uverbs in "
                    "PCIDEVICE_*_INFO) or that the pod is in the RDMA network's namespace",
                )
            )
            continue
        for port in hca.ports:
            if not port.active:
                findings.append(
                    Finding(
                        "warning",
                        "port-down",
                        f"{hca.name} port {port.number} is {port.state}; left out of NCCL_IB_HCA",
                        "check the cable/switch port (ibstat, `ip link` on the netdev)",
                    )
                )
                continue
            if port.link_layer == "Ethernet":
                index = roce_v2_ipv4_gid_index(port)
                if index is None:
                    findings.append(
                        Finding(
                            "warning",
                            "roce-no-v2-gid",
                            f"{hca.name} port {port.number} (RoCE) has no RoCE v2 GID with an IPv4 "
                            f"address; left out of NCCL_IB_HCA",
                            f"give the netdev {'/'.join(hca.netdevs) or '?'} an IPv4 address "
                            "(the SR-IOV network's IPAM) so the kernel adds the GID",
                        )
                    )
                    continue
                ports.gid_indexes[f"{hca.name}:{port.number}"] = index
            ports.entries.append(f"{hca.name}:{port.number}")
            if hca not in ports.selected:
                ports.selected.append(hca)
    return ports


def _libraries_usable(
    resources: PodResources, selected: list[Hca], findings: list[Finding]
) -> bool:
    if not resources.verbs_library:
        findings.append(
            Finding(
                "error",
                "no-verbs-library",
                "libibverbs.so.1 is not in the image: NCCL cannot open the RDMA devices",
                "install rdma-core in the image (Debian/Ubuntu: apt-get install libibverbs1 "
                "ibverbs-providers; RHEL: dnf install libibverbs)",
            )
        )
        return False
    needed = sorted({_PROVIDER_OF_DRIVER.get(hca.driver, "") for hca in selected} - {""})
    missing = [name for name in needed if name not in resources.verbs_providers]
    if missing:
        findings.append(
            Finding(
                "error",
                "no-verbs-provider",
                f"no verbs provider for {', '.join(missing)} (found: "
                f"{', '.join(resources.verbs_providers) or 'none'})",
                "install the provider (Debian/Ubuntu: apt-get install ibverbs-providers)",
            )
        )
        return False
    return True


def _memory_locking_usable(resources: PodResources, findings: list[Finding]) -> bool:
    usable = True
    memlock = resources.memlock_bytes
    if resources.memlock_known and memlock is not None and not resources.cap_ipc_lock:
        if memlock < MIN_MEMLOCK_BYTES:
            usable = False
            findings.append(
                Finding(
                    "error",
                    "memlock",
                    f"memlock limit is {format_bytes(memlock)}: RDMA memory registration fails "
                    "and NCCL falls back to TCP",
                    "raise the limit to unlimited (container runtime: LimitMEMLOCK=infinity / "
                    "default-ulimits memlock=-1) or add the IPC_LOCK capability to the container",
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "memlock",
                    f"memlock limit is {format_bytes(memlock)}, not unlimited",
                    "set it to unlimited or add the IPC_LOCK capability",
                )
            )
    if resources.cap_ipc_lock is False:
        limited = memlock is not None and resources.memlock_known
        findings.append(
            Finding(
                "warning" if limited else "info",
                "ipc-lock",
                "the container lacks CAP_IPC_LOCK"
                + (": registration is bounded by the memlock limit" if limited else ""),
                'add securityContext.capabilities.add: ["IPC_LOCK"] to the container',
            )
        )
    return usable


def _proposals(ports: _Ports, source: str) -> tuple[Proposal, ...]:
    proposals = [
        Proposal(
            "NCCL_IB_HCA",
            "=" + ",".join(ports.entries),
            f"exact match ('=') of the {len(ports.entries)} active port(s) given to the pod "
            f"(from {source}); without '=', mlx5_1 also matches mlx5_10..",
        )
    ]
    if ports.gid_indexes:
        distinct = sorted(set(ports.gid_indexes.values()))
        if len(distinct) == 1:
            proposals.append(
                Proposal(
                    "NCCL_IB_GID_INDEX",
                    str(distinct[0]),
                    "the RoCE v2 GID with an IPv4-mapped address",
                )
            )
        else:
            proposals.append(
                Proposal(
                    "NCCL_IB_ROCE_VERSION_NUM", "2", "RoCE v2 GIDs sit at different indexes per HCA"
                )
            )
            proposals.append(
                Proposal(
                    "NCCL_IB_ADDR_FAMILY", "AF_INET", "let NCCL pick each HCA's IPv4 RoCE v2 GID"
                )
            )
    return tuple(proposals)


def _transport(ports: _Ports) -> str:
    layers = {("roce" if key in ports.gid_indexes else "infiniband") for key in ports.entries}
    if layers == {"roce"}:
        return "roce"
    if layers == {"infiniband"}:
        return "infiniband"
    return "infiniband+roce"


def select_rdma(resources: PodResources) -> RdmaSelection:
    """The verbs HCA ports NCCL may use, the variables that select them, and what is wrong."""
    findings: list[Finding] = []
    if not [hca for hca in resources.hcas if hca.driver != "efa"]:
        findings.append(
            Finding(
                "info",
                "no-rdma-devices",
                "no RDMA devices in /sys/class/infiniband: NCCL uses TCP sockets",
            )
        )
        return RdmaSelection(transport="tcp", findings=tuple(findings))
    given, source = _given_hcas(resources, findings)
    if not given:
        findings.append(
            Finding(
                "error",
                "rdma-not-given",
                f"the node has {len(resources.hcas)} RDMA device(s) but none was given to this pod "
                f"(selected by {source})",
                "request the RDMA resource in the pod spec (e.g. rdma/hca_shared_devices_a, or an "
                "SR-IOV network with its resource) so the device plugin mounts /dev/infiniband",
            )
        )
        return RdmaSelection(transport="tcp", findings=tuple(findings))

    usable = True
    if not any(name.startswith("uverbs") for name in resources.dev_infiniband):
        usable = False
        findings.append(
            Finding(
                "error",
                "no-dev-infiniband",
                "RDMA devices in sysfs but no /dev/infiniband/uverbs* in the container",
                "request the RDMA device-plugin resource (it mounts /dev/infiniband), or mount the "
                "host's /dev/infiniband in a privileged pod",
            )
        )
    ports = _select_ports(given, resources, findings)
    if not ports.entries:
        usable = False
        findings.append(
            Finding(
                "error",
                "no-active-port",
                f"none of the {len(given)} RDMA device(s) given has a usable port",
                "see the port findings above",
            )
        )
    # Each check runs even after a failure, so the report lists every problem at once.
    usable = _libraries_usable(resources, ports.selected, findings) and usable
    usable = _memory_locking_usable(resources, findings) and usable
    if not usable:
        return RdmaSelection(transport="tcp", findings=tuple(findings))
    return RdmaSelection(
        transport=_transport(ports),
        hcas=tuple(ports.entries),
        settings=_proposals(ports, source),
        selected=tuple(ports.selected),
        findings=tuple(findings),
    )


def gpu_hca_affinity(resources: PodResources, selected: Iterable[Hca]) -> tuple[Affinity, ...]:
    """Each GPU's nearest selected HCA (PCI hops, then NUMA node, then name)."""
    hcas = list(selected)
    if not hcas:
        return ()
    result = []
    for gpu in resources.gpus:
        best: Hca = min(
            hcas,
            key=lambda hca: (
                pci_distance(gpu.pci_path, hca.pci_path),
                hca.numa_node != gpu.numa_node,
                natural_key(hca.name),
            ),
        )
        same_numa = gpu.numa_node == best.numa_node
        result.append(
            Affinity(
                gpu=gpu.index,
                gpu_pci=gpu.pci_address,
                hca=best.name,
                pci_hops=pci_distance(gpu.pci_path, best.pci_path),
                same_numa=same_numa,
                link=_link_type(gpu.pci_path, best.pci_path, same_numa),
            )
        )
    return tuple(result)


def _link_type(a: tuple[str, ...], b: tuple[str, ...], same_numa: bool) -> str:
    """Classify a PCI path the way ``nvidia-smi topo -m`` (and NCCL's topology) names it."""
    common = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        common += 1
    if common == 0:  # different root complexes
        return "NODE" if same_numa else "SYS"
    if common == 1:  # meet only at the host bridge
        return "PHB"
    return "PIX" if pci_distance(a, b) <= 4 else "PXB"
