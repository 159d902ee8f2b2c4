"""What the pod was actually given for collectives: HCAs, ports, GIDs, netdevs, GPUs, limits, libraries.

Reads only local files (sysfs, /proc, /dev, the downward-API annotations file) under injectable
paths, so the same code runs against fixture trees; it never opens a socket or changes anything.
Past 500 lines on purpose: one reader per kind of fact (HCA, port, GID table, netdev, GPU, limit,
library), each short, all sharing the path roots; split, they would only pass those roots around.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CAP_IPC_LOCK",
    "Gid",
    "Gpu",
    "Hca",
    "HostPaths",
    "NetworkAttachment",
    "PodResources",
    "Port",
    "discover",
    "natural_key",
    "parse_downward_annotations",
    "parse_env_file",
    "parse_memlock_limit",
    "parse_network_status",
    "parse_sriov_env",
    "pci_distance",
]

#: Bit of CAP_IPC_LOCK in /proc/<pid>/status CapEff (linux/capability.h).
CAP_IPC_LOCK = 14

NETWORK_STATUS_ANNOTATION = "k8s.v1.cni.cncf.io/network-status"

_DEFAULT_LIB_DIRS = (
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib64",
    "usr/local/lib",
    "opt/amazon/efa/lib",
    "opt/amazon/efa/lib64",
    "opt/amazon/ofi-nccl/lib",
    "opt/amazon/ofi-nccl/lib64",
    "opt/aws-ofi-nccl/lib",
    "usr/local/gib/lib64",
)


@dataclass(frozen=True, kw_only=True)
class HostPaths:
    """Where discovery reads from; every field is relative to ``root`` unless absolute.

    ``HostPaths()`` reads the running pod; ``HostPaths(root="tests/fixtures/sysfs/dgx-h100-ib8")``
    reads a captured tree. ``shm_bytes`` replaces the statvfs of ``<dev>/shm`` (a fixture tree cannot
    model a tmpfs size). ``lib_dirs`` are searched after the entries of ``LD_LIBRARY_PATH``.
    ``podinfo`` is where the downward-API volume with the pod's ``annotations`` is mounted.
    """

    root: str = "/"
    sys: str = "sys"
    dev: str = "dev"
    proc_self: str = "proc/self"
    proc_net_route: str = "proc/net/route"
    proc_nvidia_gpus: str = "proc/driver/nvidia/gpus"
    podinfo: str = "etc/podinfo"
    lib_dirs: tuple[str, ...] = _DEFAULT_LIB_DIRS
    shm_bytes: int | None = None

    def path(self, relative: str, *more: str) -> str:
        return os.path.join(self.root, relative.lstrip("/"), *more)

    @classmethod
    def from_kwargs(cls, **paths: object) -> HostPaths:
        """Build from keyword overrides, naming the unknown keyword in the error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(paths) - known)
        if unknown:
            raise TypeError(f"unknown host path(s) {unknown}; known: {sorted(known)}")
        if "lib_dirs" in paths and isinstance(paths["lib_dirs"], str):
            paths["lib_dirs"] = (paths["lib_dirs"],)
        return cls(**paths)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Gid:
    index: int
    gid: str
    type: str  # "IB/RoCE v1", "RoCE v2" or "" when the kernel does not say
    ndev: str = ""

    @property
    def is_ipv4_mapped(self) -> bool:
        try:
            address = ipaddress.IPv6Address(self.gid)
        except ValueError:
            return False
        return address.ipv4_mapped is not None

    @property
    def ipv4(self) -> str | None:
        try:
            mapped = ipaddress.IPv6Address(self.gid).ipv4_mapped
        except ValueError:
            return None
        return str(mapped) if mapped else None


@dataclass(frozen=True)
class Port:
    number: int
    state: str  # "ACTIVE", "DOWN", "INIT", ...
    link_layer: str  # "InfiniBand" or "Ethernet"
    rate: str = ""
    gids: tuple[Gid, ...] = ()

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"


@dataclass(frozen=True)
class Hca:
    """One RDMA device (``/sys/class/infiniband/<name>``) with the PCI function behind it."""

    name: str
    driver: str  # kernel driver of the PCI function: mlx5_core, efa, irdma, bnxt_en, ...
    pci_address: str
    numa_node: int
    pci_path: tuple[str, ...]  # PCI bridges from the root complex down to the function
    ports: tuple[Port, ...]
    netdevs: tuple[str, ...] = ()
    uverbs: str = ""  # "uverbs3" when the kernel exposes the verbs char device for it
    is_virtual_function: bool = False

    @property
    def active_ports(self) -> tuple[Port, ...]:
        return tuple(port for port in self.ports if port.active)

    @property
    def link_layer(self) -> str:
        layers = {port.link_layer for port in self.ports}
        return layers.pop() if len(layers) == 1 else "/".join(sorted(layers))


@dataclass(frozen=True)
class Gpu:
    index: int  # device minor: /dev/nvidia<index>
    pci_address: str
    numa_node: int
    pci_path: tuple[str, ...]
    model: str = ""


@dataclass(frozen=True)
class NetworkAttachment:
    """One entry of the Multus network-status annotation."""

    name: str
    interface: str
    ips: tuple[str, ...] = ()
    default: bool = False
    pci_address: str = ""
    rdma_device: str = ""


@dataclass(frozen=True, kw_only=True)
class PodResources:
    """Everything the plan is computed from; plain data, built from fixtures in tests."""

    hcas: tuple[Hca, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    dev_infiniband: tuple[str, ...] = ()  # entries of /dev/infiniband (uverbs0, rdma_cm, ...)
    memlock_bytes: int | None = None  # None: unlimited
    memlock_known: bool = True
    shm_bytes: int | None = None
    cap_ipc_lock: bool | None = None  # None: unknown
    verbs_library: str = ""  # path of libibverbs.so.1, "" when missing
    verbs_providers: tuple[str, ...] = ()  # provider names found (mlx5, efa, ...)
    nccl_net_plugin: str = ""  # path of libnccl-net*.so, "" when missing
    sriov_devices: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # resource -> PCI addrs
    network_status: tuple[NetworkAttachment, ...] = ()
    default_route_interface: str = ""
    interfaces: tuple[str, ...] = ()
    platform_files: Mapping[str, str] = field(default_factory=dict)  # profile key -> path found
    platform_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # key -> K=V read

    @property
    def allocated_pci_addresses(self) -> frozenset[str]:
        """PCI functions the device plugin / Multus says belong to this pod (empty: not said)."""
        addresses = {address for group in self.sriov_devices.values() for address in group}
        addresses |= {
            attachment.pci_address for attachment in self.network_status if attachment.pci_address
        }
        return frozenset(addresses)


# ---------------------------------------------------------------------------------------------
# Small parsers (pure, tested directly)


def parse_memlock_limit(limits_text: str) -> tuple[int | None, bool]:
    """Soft memlock limit from /proc/<pid>/limits: (bytes or None for unlimited, found)."""
    for line in limits_text.splitlines():
        if line.startswith("Max locked memory"):
            fields = line[len("Max locked memory") :].split()
            if not fields:
                break
            soft = fields[0]
            return (None if soft == "unlimited" else int(soft)), True
    return None, False


def parse_cap_ipc_lock(status_text: str) -> bool | None:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return None


def parse_sriov_env(env: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """``PCIDEVICE_<RESOURCE>=0000:3b:02.1,0000:3b:02.2`` variables of the SR-IOV device plugin.

    The ``_INFO`` companions (JSON, newer plugin versions) name the same functions and are skipped.
    """
    pci = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
    devices: dict[str, tuple[str, ...]] = {}
    for name, value in sorted(env.items()):
        if not name.startswith("PCIDEVICE_") or name.endswith("_INFO"):
            continue
        addresses = tuple(part.strip().lower() for part in value.split(",") if part.strip())
        if addresses and all(pci.match(address) for address in addresses):
            devices[name[len("PCIDEVICE_") :]] = addresses
    return devices


def parse_downward_annotations(text: str) -> dict[str, str]:
    """The downward-API ``annotations`` file: one ``key="Go-quoted value"`` per line."""
    annotations: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep:
            continue
        try:
            value = json.loads(quoted)
        except json.JSONDecodeError:
            value = quoted.strip('"')
        if isinstance(value, str):
            annotations[key.strip()] = value
    return annotations


def parse_network_status(value: str) -> tuple[NetworkAttachment, ...]:
    """Multus ``k8s.v1.cni.cncf.io/network-status`` JSON (device-info per the NPWG spec 1.1)."""
    try:
        entries = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{NETWORK_STATUS_ANNOTATION} is not JSON ({error}); check the downward-API volume"
        ) from error
    attachments = []
    for entry in entries if isinstance(entries, list) else []:
        device_info = entry.get("device-info") or {}
        pci = device_info.get("pci") or {}
        attachments.append(
            NetworkAttachment(
                name=str(entry.get("name", "")),
                interface=str(entry.get("interface", "")),
                ips=tuple(entry.get("ips") or ()),
                default=bool(entry.get("default", False)),
                pci_address=str(pci.get("pci-address", "")).lower(),
                rdma_device=str(pci.get("rdma-device", "")),
            )
        )
    return tuple(attachments)


def parse_default_route(route_text: str) -> str:
    """Interface of the IPv4 default route in /proc/net/route ("" when none)."""
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            return fields[0]
    return ""


# ---------------------------------------------------------------------------------------------
# Readers


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return default


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key putting mlx5_2 before mlx5_10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path), key=natural_key)
    except OSError:
        return []


def _pci_placement(paths: HostPaths, device_link: str) -> tuple[str, tuple[str, ...], int, str]:
    """(PCI address, bridge path, NUMA node, driver) of a sysfs ``device`` link."""
    real = os.path.realpath(device_link)
    sys_root = os.path.realpath(paths.path(paths.sys))
    relative = os.path.relpath(real, sys_root).split(os.sep)
    # devices/pci0000:17/0000:17:00.0/0000:18:00.0 -> ("0000:17:00.0", "0000:18:00.0")
    pci_path = tuple(part for part in relative if re.match(r"^(pci)?[0-9a-f]{4}:[0-9a-f]{2}", part))
    numa_text = _read(os.path.join(real, "numa_node"), "-1")
    driver = (
        os.path.basename(os.path.realpath(os.path.join(real, "driver")))
        if os.path.exists(os.path.join(real, "driver"))
        else ""
    )
    address = pci_path[-1] if len(pci_path) > 1 else os.path.basename(real)
    return address, pci_path, int(numa_text or -1), driver


def _read_gids(port_dir: str) -> tuple[Gid, ...]:
    gids = []
    for name in _listdir(os.path.join(port_dir, "gids")):
        if not name.isdigit():
            continue
        value = _read(os.path.join(port_dir, "gids", name))
        if not value or set(value) <= {"0", ":"}:
            continue  # an unused slot of the 255-entry table
        gid_type = _read(os.path.join(port_dir, "gid_attrs", "types", name))
        ndev = _read(os.path.join(port_dir, "gid_attrs", "ndevs", name))
        gids.append(Gid(index=int(name), gid=value, type=gid_type, ndev=ndev))
    return tuple(sorted(gids, key=lambda gid: gid.index))


def _read_hcas(paths: HostPaths) -> tuple[Hca, ...]:
    class_dir = paths.path(paths.sys, "class", "infiniband")
    uverbs_of: dict[str, str] = {}
    verbs_dir = paths.path(paths.sys, "class", "infiniband_verbs")
    for uverbs in _listdir(verbs_dir):
        ibdev = _read(os.path.join(verbs_dir, uverbs, "ibdev"))
        if ibdev:
            uverbs_of[ibdev] = uverbs
    hcas = []
    for name in _listdir(class_dir):
        hca_dir = os.path.join(class_dir, name)
        ports = []
        for number in _listdir(os.path.join(hca_dir, "ports")):
            if not number.isdigit():
                continue
            port_dir = os.path.join(hca_dir, "ports", number)
            state = _read(os.path.join(port_dir, "state"))  # "4: ACTIVE"
            ports.append(
                Port(
                    number=int(number),
                    state=state.split(":", 1)[-1].strip() if state else "UNKNOWN",
                    link_layer=_read(os.path.join(port_dir, "link_layer"), "InfiniBand"),
                    rate=_read(os.path.join(port_dir, "rate")),
                    gids=_read_gids(port_dir),
                )
            )
        device_link = os.path.join(hca_dir, "device")
        address, pci_path, numa, driver = _pci_placement(paths, device_link)
        hcas.append(
            Hca(
                name=name,
                driver=driver,
                pci_address=address,
                numa_node=numa,
                pci_path=pci_path,
                ports=tuple(sorted(ports, key=lambda port: port.number)),
                netdevs=tuple(_listdir(os.path.join(device_link, "net"))),
                uverbs=uverbs_of.get(name, ""),
                is_virtual_function=os.path.exists(os.path.join(device_link, "physfn")),
            )
        )
    return tuple(hcas)


def _read_gpus(paths: HostPaths) -> tuple[Gpu, ...]:
    """GPUs this container can open: ``/dev/nvidia<N>``, placed through the driver's proc files.

    sysfs lists every GPU of the node; the device nodes are what the device plugin mounted.
    """
    dev_dir = paths.path(paths.dev)
    minors = {
        int(name[len("nvidia") :]) for name in _listdir(dev_dir) if re.match(r"^nvidia\d+$", name)
    }
    by_minor: dict[int, tuple[str, str]] = {}
    gpus_dir = paths.path(paths.proc_nvidia_gpus)
    for bus in _listdir(gpus_dir):
        info = _read(os.path.join(gpus_dir, bus, "information"))
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in info.splitlines())
        )
        if fields.get("Device Minor", "").isdigit():
            by_minor[int(fields["Device Minor"])] = (bus.lower(), fields.get("Model", ""))
    gpus = []
    for minor in sorted(minors):
        bus, model = by_minor.get(minor, ("", ""))
        pci_path: tuple[str, ...] = ()
        numa = -1
        if bus:
            _, pci_path, numa, _ = _pci_placement(
                paths, paths.path(paths.sys, "bus", "pci", "devices", bus)
            )
        gpus.append(
            Gpu(index=minor, pci_address=bus, numa_node=numa, pci_path=pci_path, model=model)
        )
    return tuple(gpus)


def _find_library(paths: HostPaths, env: Mapping[str, str], pattern: str) -> str:
    extra = tuple(part for part in env.get("LD_LIBRARY_PATH", "").split(":") if part)
    regex = re.compile(pattern)
    for directory in (*extra, *paths.lib_dirs):
        full = paths.path(directory)
        for name in _listdir(full):
            if regex.fullmatch(name):
                return os.path.join(full, name)
    return ""


def _verbs_providers(paths: HostPaths, env: Mapping[str, str]) -> tuple[str, ...]:
    """rdma-core providers: ``libibverbs/lib<name>-rdmav<N>.so`` or ``lib<name>.so.1`` + driver file."""
    providers: set[str] = set()
    extra = tuple(part for part in env.get("LD_LIBRARY_PATH", "").split(":") if part)
    for directory in (*extra, *paths.lib_dirs):
        for name in _listdir(paths.path(directory, "libibverbs")):
            match = re.fullmatch(r"lib(\w+?)-rdmav\d+\.so", name)
            if match:
                providers.add(match.group(1))
    return tuple(sorted(providers))


_PLATFORM_FILES = {
    # NCCL reads this file itself; variables set in the environment override it.
    "nccl_conf": "etc/nccl.conf",
    # Google's GPUDirect-RDMA (gIB) images: a script the user is told to source.
    "gcp_gib_env": "usr/local/gib/scripts/set_nccl_env.sh",
    # Azure ND-series images: NCCL topology files describing the VM's PCIe layout.
    "azure_topology": "opt/microsoft/ndv5-topo.xml",
    "azure_topology_v4": "opt/microsoft/ndv4-topo.xml",
    # AWS: the EFA installer (libfabric with the efa provider).
    "aws_efa": "opt/amazon/efa",
}


def _platform_files(paths: HostPaths) -> dict[str, str]:
    found = {}
    for key, relative in _PLATFORM_FILES.items():
        full = paths.path(relative)
        if os.path.exists(full):
            found[key] = full
    return found


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` and ``export KEY=VALUE`` lines (nccl.conf, vendor env scripts); others skipped."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if match:
            values[match.group(1)] = match.group(2).strip().strip("'\"")
    return values


def discover(paths: HostPaths | None = None, env: Mapping[str, str] | None = None) -> PodResources:
    """Read what this pod was given. Only local files are read; nothing is changed."""
    paths = paths or HostPaths()
    env = os.environ if env is None else env
    memlock, memlock_known = parse_memlock_limit(_read(paths.path(paths.proc_self, "limits")))
    shm_bytes = paths.shm_bytes
    if shm_bytes is None:
        try:
            stat = os.statvfs(paths.path(paths.dev, "shm"))
            shm_bytes = stat.f_frsize * stat.f_blocks
        except OSError:
            shm_bytes = None
    network_status: tuple[NetworkAttachment, ...] = ()
    annotations_text = _read(paths.path(paths.podinfo, "annotations"))
    if annotations_text:
        status = parse_downward_annotations(annotations_text).get(NETWORK_STATUS_ANNOTATION)
        if status:
            network_status = parse_network_status(status)
    platform_files = _platform_files(paths)
    return PodResources(
        hcas=_read_hcas(paths),
        gpus=_read_gpus(paths),
        dev_infiniband=tuple(_listdir(paths.path(paths.dev, "infiniband"))),
        memlock_bytes=memlock,
        memlock_known=memlock_known,
        shm_bytes=shm_bytes,
        cap_ipc_lock=parse_cap_ipc_lock(_read(paths.path(paths.proc_self, "status"))),
        verbs_library=_find_library(paths, env, r"libibverbs\.so\.1(\.[\d.]+)?"),
        verbs_providers=_verbs_providers(paths, env),
        nccl_net_plugin=_find_library(paths, env, r"libnccl-net(-ofi)?\.so"),
        sriov_devices=parse_sriov_env(env),
        network_status=network_status,
        default_route_interface=parse_default_route(_read(paths.path(paths.proc_net_route))),
        interfaces=tuple(_listdir(paths.path(paths.sys, "class", "net"))),
        platform_files=platform_files,
        platform_env={
            key: parse_env_file(_read(path))
            for key, path in platform_files.items()
            if key in ("nccl_conf", "gcp_gib_env")
        },
    )


def pci_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Hops between two PCI functions through their common bridge (0: same function)."""
    common = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        common += 1
    return (len(a) - common) + (len(b) - common)
