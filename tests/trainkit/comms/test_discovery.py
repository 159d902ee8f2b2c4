"""Discovery against fixture trees modelled on real machines, and its small parsers."""

from __future__ import annotations

import json

import pytest

from tests.trainkit.comms.conftest import load_machine
from trainkit.comms.discovery import (
    HostPaths,
    discover,
    natural_key,
    parse_default_route,
    parse_downward_annotations,
    parse_env_file,
    parse_memlock_limit,
    parse_network_status,
    parse_sriov_env,
    pci_distance,
)


def test_dgx_h100_hcas_ports_gpus_and_placement() -> None:
    m = load_machine("dgx-h100-ib8")
    r = discover(HostPaths(**m.paths), m.env)
    names = [hca.name for hca in r.hcas]
    # Natural order (mlx5_2 before mlx5_10); DGX-style naming with gaps where storage NICs sit.
    assert names == [f"mlx5_{i}" for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 11)]
    ib = [hca for hca in r.hcas if hca.link_layer == "InfiniBand"]
    assert len(ib) == 8
    down = [hca.name for hca in ib if not hca.active_ports]
    assert down == ["mlx5_6"]
    mlx5_0 = r.hcas[0]
    assert mlx5_0.driver == "mlx5_core"
    assert mlx5_0.pci_address == "0000:19:00.0"
    assert mlx5_0.numa_node == 0
    assert mlx5_0.uverbs == "uverbs0"
    assert mlx5_0.netdevs == ("ibp25s0",)
    assert mlx5_0.ports[0].rate.startswith("400 Gb/sec")
    # Storage NICs exist in sysfs but their verbs nodes were not mounted into the pod.
    assert "uverbs1" not in r.dev_infiniband and "uverbs0" in r.dev_infiniband
    assert [gpu.index for gpu in r.gpus] == list(range(8))
    assert r.gpus[0].pci_address == "0000:18:00.0" and r.gpus[4].numa_node == 1
    # GPU0 and mlx5_0 share a PCIe switch: up to the switch and down again.
    assert pci_distance(r.gpus[0].pci_path, mlx5_0.pci_path) == 4
    assert r.memlock_bytes is None and r.memlock_known
    assert r.cap_ipc_lock is True
    assert r.verbs_library.endswith("libibverbs.so.1") and r.verbs_providers == ("mlx5",)
    assert r.default_route_interface == "eth0"


def test_roce_gid_table_types_and_ipv4_mapping() -> None:
    m = load_machine("roce-gid3")
    r = discover(HostPaths(**m.paths), m.env)
    port = r.hcas[0].ports[0]
    assert port.link_layer == "Ethernet"
    assert [(g.index, g.type, g.is_ipv4_mapped) for g in port.gids] == [
        (0, "IB/RoCE v1", False),
        (1, "RoCE v2", False),
        (2, "IB/RoCE v1", True),
        (3, "RoCE v2", True),
    ]
    assert port.gids[3].ipv4 == "10.0.1.5" and port.gids[3].ndev == "ens1f0np0"
    assert r.cap_ipc_lock is False


def test_sriov_vfs_named_by_pcidevice_and_multus() -> None:
    m = load_machine("sriov-vf")
    r = discover(HostPaths(**m.paths), m.env)
    assert r.sriov_devices == {
        "NVIDIA_COM_SRIOV_RDMA_A": ("0000:3b:00.2",),
        "NVIDIA_COM_SRIOV_RDMA_B": ("0000:86:00.2",),
    }
    assert [(a.interface, a.default, a.pci_address, a.rdma_device) for a in r.network_status] == [
        ("eth0", True, "", ""),
        ("net1", False, "0000:3b:00.2", "mlx5_1"),
        ("net2", False, "0000:86:00.2", "mlx5_6"),
    ]
    vfs = {hca.name: hca for hca in r.hcas if hca.is_virtual_function}
    assert len(vfs) == 8 and vfs["mlx5_1"].netdevs == ("net1",)
    assert r.allocated_pci_addresses == {"0000:3b:00.2", "0000:86:00.2"}


def test_memlock_and_no_rdma_and_efa() -> None:
    assert discover(HostPaths(**load_machine("memlock-64k").paths), {}).memlock_bytes == 65536
    no_rdma = discover(HostPaths(**load_machine("no-rdma").paths), {})
    assert no_rdma.hcas == () and no_rdma.dev_infiniband == () and no_rdma.verbs_library == ""
    assert no_rdma.shm_bytes == 64 << 20 and len(no_rdma.gpus) == 4
    efa = discover(HostPaths(**load_machine("aws-efa").paths), {})
    assert {hca.driver for hca in efa.hcas} == {"efa"} and efa.nccl_net_plugin.endswith(
        "libnccl-net.so"
    )
    assert "aws_efa" in efa.platform_files


def test_library_search_follows_ld_library_path(tmp_path) -> None:
    (tmp_path / "opt/custom/lib").mkdir(parents=True)
    (tmp_path / "opt/custom/lib/libibverbs.so.1").write_text("")
    found = discover(
        HostPaths(root=str(tmp_path), lib_dirs=()), {"LD_LIBRARY_PATH": "/opt/custom/lib"}
    )
    assert found.verbs_library == str(tmp_path / "opt/custom/lib/libibverbs.so.1")


def test_unknown_host_path_is_named() -> None:
    with pytest.raises(TypeError, match="sysfs"):
        HostPaths.from_kwargs(sysfs="/x")


def test_parsers() -> None:
    assert parse_memlock_limit("Max locked memory         65536    65536    bytes") == (65536, True)
    assert parse_memlock_limit("Max locked memory  unlimited  unlimited  bytes") == (None, True)
    assert parse_memlock_limit("") == (None, False)
    assert parse_sriov_env(
        {
            "PCIDEVICE_X": "0000:3B:02.1, 0000:3b:02.2",
            "PCIDEVICE_X_INFO": "{}",
            "PCIDEVICE_BAD": "eth0",
            "OTHER": "0000:3b:02.1",
        }
    ) == {"X": ("0000:3b:02.1", "0000:3b:02.2")}
    status = json.dumps([{"name": "a", "interface": "eth0", "default": True}])
    annotations = parse_downward_annotations(
        f'k8s.v1.cni.cncf.io/network-status={json.dumps(status)}\nx="y"'
    )
    assert annotations["x"] == "y"
    assert (
        parse_network_status(annotations["k8s.v1.cni.cncf.io/network-status"])[0].interface
        == "eth0"
    )
    with pytest.raises(ValueError, match="network-status"):
        parse_network_status("[{")
    assert (
        parse_default_route(
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
            "net1\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
            "eth0\t00000000\t0101F40A\t0003\t0\t0\t0\t00000000\n"
        )
        == "eth0"
    )
    assert parse_env_file("# c\nexport NCCL_A=1\nNCCL_B='x y'\nnot a line") == {
        "NCCL_A": "1",
        "NCCL_B": "x y",
    }
    assert sorted(["mlx5_10", "mlx5_2", "mlx5_1"], key=natural_key) == [
        "mlx5_1",
        "mlx5_2",
        "mlx5_10",
    ]
