"""The collective-communication plan: NCCL/torch variables derived from what the pod was given.

``build_plan`` is a pure function of ``PodResources`` and the environment: each variable carries
its provenance (user, platform, detected) and a reason, and a variable the user set is never replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from trainkit.comms.discovery import Hca, PodResources, Port, natural_key, pci_distance

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

#: A finite memlock limit below this (without CAP_IPC_LOCK) cannot register NCCL's buffers.
MIN_MEMLOCK_BYTES = 1 << 30
#: /dev/shm below this starves NCCL's shared-memory transport and DataLoader workers (64 MiB default).
MIN_SHM_BYTES = 1 << 30

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


@dataclass(frozen=True)
class Finding:
    severity: str  # "error", "warning" or "info"
    code: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Affinity:
    """A GPU and its nearest given HCA; ``link`` uses ``nvidia-smi topo -m``'s names."""

    gpu: int
    gpu_pci: str
    hca: str
    pci_hops: int
    same_numa: bool
    link: str  # PIX (one PCIe switch), PXB (several bridges), PHB (host bridge), NODE, SYS


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


# ---------------------------------------------------------------------------------------------
# Platform profiles: detected from files or devices; their variables have provenance "platform".


@dataclass(frozen=True)
class _ProfileResult:
    settings: tuple[tuple[str, str, str], ...]  # (name, value, reason)
    transport: str | None  # overrides the generic transport decision when not None
    findings: tuple[Finding, ...] = ()
    skip_generic_rdma: bool = False


def _profile_aws_efa(resources: PodResources) -> _ProfileResult | None:
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
        return _ProfileResult(settings=(), transport=None, findings=(missing,))
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
    settings = [
        ("FI_PROVIDER", "efa", "AWS EFA: libfabric's efa provider under the aws-ofi-nccl plugin")
    ]
    # FI_EFA_USE_DEVICE_RDMA is left to libfabric: it enables RDMA reads where the instance has
    # them, and forcing it on an instance without them makes the provider fail to open.
    return _ProfileResult(
        settings=tuple(settings),
        transport="efa" if usable else "tcp",
        findings=tuple(findings),
        skip_generic_rdma=True,
    )


def _profile_gcp_gib(resources: PodResources) -> _ProfileResult | None:
    values = resources.platform_env.get("gcp_gib_env")
    if values is None:
        return None
    path = resources.platform_files.get("gcp_gib_env", "")
    return _ProfileResult(
        settings=tuple(
            (name, value, f"from the platform's {path}") for name, value in values.items()
        ),
        transport=None,
    )


def _profile_nccl_conf(resources: PodResources) -> _ProfileResult | None:
    values = resources.platform_env.get("nccl_conf")
    if not values:
        return None
    path = resources.platform_files.get("nccl_conf", "")
    return _ProfileResult(
        settings=tuple(
            (name, value, f"from {path} (NCCL reads it too)") for name, value in values.items()
        ),
        transport=None,
    )


def _profile_azure_nd(resources: PodResources) -> _ProfileResult | None:
    path = resources.platform_files.get("azure_topology") or resources.platform_files.get(
        "azure_topology_v4"
    )
    if not path:
        return None
    return _ProfileResult(
        settings=(
            ("NCCL_TOPO_FILE", path, "Azure ND: the VM's PCIe topology, hidden from the guest"),
        ),
        transport=None,
    )


#: Profiles by name, tried in order; each returns None when it does not apply to the pod.
PROFILES: dict[str, Callable[[PodResources], _ProfileResult | None]] = {
    "aws-efa": _profile_aws_efa,
    "gcp-gib": _profile_gcp_gib,
    "azure-nd": _profile_azure_nd,
    "nccl-conf": _profile_nccl_conf,
}


# ---------------------------------------------------------------------------------------------
# Generic RDMA (InfiniBand and RoCE through the verbs provider)


def _roce_v2_ipv4_gid_index(port: Port) -> int | None:
    for gid in port.gids:
        if gid.type.strip().lower() == "roce v2" and gid.is_ipv4_mapped:
            return gid.index
    return None


def _format_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:g} {unit}"
    return f"{num_bytes} B"


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


def _generic_rdma(
    resources: PodResources, findings: list[Finding]
) -> tuple[str, list[str], list[tuple[str, str, str]], list[Hca]]:
    """(transport, hca:port entries, settings, selected HCAs) for verbs-capable HCAs."""
    if not [hca for hca in resources.hcas if hca.driver != "efa"]:
        findings.append(
            Finding(
                "info",
                "no-rdma-devices",
                "no RDMA devices in /sys/class/infiniband: NCCL uses TCP sockets",
            )
        )
        return "tcp", [], [], []
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
        return "tcp", [], [], []

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

    entries: list[str] = []
    selected: list[Hca] = []
    gid_indexes: dict[str, int] = {}
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
                index = _roce_v2_ipv4_gid_index(port)
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
                gid_indexes[f"{hca.name}:{port.number}"] = index
            entries.append(f"{hca.name}:{port.number}")
            if hca not in selected:
                selected.append(hca)
    if not entries:
        usable = False
        findings.append(
            Finding(
                "error",
                "no-active-port",
                f"none of the {len(given)} RDMA device(s) given has a usable port",
                "see the port findings above",
            )
        )

    if not resources.verbs_library:
        usable = False
        findings.append(
            Finding(
                "error",
                "no-verbs-library",
                "libibverbs.so.1 is not in the image: NCCL cannot open the RDMA devices",
                "install rdma-core in the image (Debian/Ubuntu: apt-get install libibverbs1 "
                "ibverbs-providers; RHEL: dnf install libibverbs)",
            )
        )
    else:
        needed = sorted({_PROVIDER_OF_DRIVER.get(hca.driver, "") for hca in selected} - {""})
        missing = [name for name in needed if name not in resources.verbs_providers]
        if missing:
            usable = False
            findings.append(
                Finding(
                    "error",
                    "no-verbs-provider",
                    f"no verbs provider for {', '.join(missing)} (found: "
                    f"{', '.join(resources.verbs_providers) or 'none'})",
                    "install the provider (Debian/Ubuntu: apt-get install ibverbs-providers)",
                )
            )

    memlock = resources.memlock_bytes
    if resources.memlock_known and memlock is not None and not resources.cap_ipc_lock:
        if memlock < MIN_MEMLOCK_BYTES:
            usable = False
            findings.append(
                Finding(
                    "error",
                    "memlock",
                    f"memlock limit is {_format_bytes(memlock)}: RDMA memory registration fails "
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
                    f"memlock limit is {_format_bytes(memlock)}, not unlimited",
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
    if not usable:
        return "tcp", [], [], []

    settings = [
        (
            "NCCL_IB_HCA",
            "=" + ",".join(entries),
            f"exact match ('=') of the {len(entries)} active port(s) given to the pod (from {source}); "
            "without '=', mlx5_1 also matches mlx5_10..",
        )
    ]
    if gid_indexes:
        distinct = sorted(set(gid_indexes.values()))
        if len(distinct) == 1:
            settings.append(
                (
                    "NCCL_IB_GID_INDEX",
                    str(distinct[0]),
                    "the RoCE v2 GID with an IPv4-mapped address",
                )
            )
        else:
            settings.append(
                ("NCCL_IB_ROCE_VERSION_NUM", "2", "RoCE v2 GIDs sit at different indexes per HCA")
            )
            settings.append(
                ("NCCL_IB_ADDR_FAMILY", "AF_INET", "let NCCL pick each HCA's IPv4 RoCE v2 GID")
            )
    layers = {("roce" if key in gid_indexes else "infiniband") for key in entries}
    transport = (
        "roce"
        if layers == {"roce"}
        else "infiniband"
        if layers == {"infiniband"}
        else "infiniband+roce"
    )
    return transport, entries, settings, selected


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


def _affinity(resources: PodResources, selected: Iterable[Hca]) -> tuple[Affinity, ...]:
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
        hops = pci_distance(gpu.pci_path, best.pci_path)
        same_numa = gpu.numa_node == best.numa_node
        result.append(
            Affinity(
                gpu=gpu.index,
                gpu_pci=gpu.pci_address,
                hca=best.name,
                pci_hops=hops,
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


def _user_findings(resources: PodResources, env: Mapping[str, str], rdma: bool) -> list[Finding]:
    findings = []
    hca_value = env.get("NCCL_IB_HCA", "")
    if hca_value and not hca_value.startswith(("=", "^=")):
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
    gid_value = env.get("NCCL_IB_GID_INDEX", "")
    if gid_value.lstrip("-").isdigit() and int(gid_value) >= 0:
        index = int(gid_value)
        for hca in resources.hcas:
            for port in hca.active_ports:
                if port.link_layer != "Ethernet":
                    continue
                gid = next((g for g in port.gids if g.index == index), None)
                if gid is None or gid.type.lower() != "roce v2" or not gid.is_ipv4_mapped:
                    found = f"{gid.type or 'untyped'} {gid.gid}" if gid else "an empty slot"
                    good = _roce_v2_ipv4_gid_index(port)
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
    if env.get("NCCL_IB_DISABLE") == "1" and rdma:
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


def _set_by_torchrun(name: str, env: Mapping[str, str]) -> bool:
    # torchrun (and trainkit-run) give every worker TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless set.
    return (
        name == "TORCH_NCCL_ASYNC_ERROR_HANDLING"
        and "TORCHELASTIC_RUN_ID" in env
        and env.get(name) == "1"
    )


def build_plan(
    resources: PodResources,
    env: Mapping[str, str],
    *,
    ours: Iterable[str] = (),
) -> Plan:
    """Compute the plan. ``ours`` names variables a previous ``apply_plan`` set (not the user's)."""
    ours = set(ours)
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
        for setting_name, value, reason in result.settings:
            propose(setting_name, value, "platform", reason)
        findings.extend(result.findings)
        transport_override = transport_override or result.transport
        skip_generic = skip_generic or result.skip_generic_rdma

    entries: list[str] = []
    selected: list[Hca] = []
    if skip_generic:
        transport = transport_override or "tcp"
    else:
        transport, entries, rdma_settings, selected = _generic_rdma(resources, findings)
        for setting_name, value, reason in rdma_settings:
            propose(setting_name, value, "detected", reason)
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
                f"/dev/shm is {_format_bytes(resources.shm_bytes)}: NCCL's shared-memory transport "
                "and DataLoader workers run out of it",
                "mount an emptyDir with medium: Memory (sizeLimit of a few GiB) at /dev/shm",
            )
        )
    affinity = _affinity(resources, selected)
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
    findings.extend(_user_findings(resources, env, transport != "tcp"))
    if env.get("TRAINKIT_REQUIRE_RDMA") == "1" and transport == "tcp":
        findings.append(
            Finding(
                "error",
                "require-rdma",
                "TRAINKIT_REQUIRE_RDMA=1 but the plan falls back to TCP",
                "fix the errors above, or unset TRAINKIT_REQUIRE_RDMA to accept TCP",
            )
        )

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
    return Plan(
        transport=transport,
        profile=profile_name,
        hcas=tuple(entries),
        settings=tuple(settings),
        findings=tuple(findings),
        affinity=affinity,
    )
