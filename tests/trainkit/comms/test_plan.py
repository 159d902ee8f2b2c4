"""The plan for each fixture machine: exact variables, provenance, reasons and findings."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from tests.trainkit.comms.conftest import load_machine
from trainkit.comms.discovery import HostPaths, discover
from trainkit.comms.plan import Plan, build_plan

BASE = {"NCCL_SOCKET_IFNAME": "=eth0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def plan_for(name: str, env: dict[str, str] | None = None, **overrides: object) -> Plan:
    m = load_machine(name)
    full_env = {**m.env, **(env or {})}
    resources = discover(HostPaths(**{**m.paths, **overrides}), full_env)
    return build_plan(resources, full_env)


def codes(plan: Plan, severity: str | None = None) -> list[str]:
    return [f.code for f in plan.findings if severity is None or f.severity == severity]


def test_eight_ib_hcas_one_port_down() -> None:
    plan = plan_for("dgx-h100-ib8")
    assert plan.transport == "infiniband" and plan.rdma_usable
    assert plan.to_export() == {
        **BASE,
        "NCCL_IB_HCA": "=mlx5_0:1,mlx5_3:1,mlx5_4:1,mlx5_5:1,mlx5_9:1,mlx5_10:1,mlx5_11:1",
    }
    assert codes(plan) == ["port-down"]
    assert "mlx5_6 port 1 is DOWN" in plan.findings[0].message
    hca = next(s for s in plan.settings if s.name == "NCCL_IB_HCA")
    assert (
        hca.source == "detected" and "exact match" in hca.reason and "/dev/infiniband" in hca.reason
    )
    # Every GPU gets a same-NUMA HCA; GPU4's own switch-mate (mlx5_6) is down.
    assert all(a.same_numa for a in plan.affinity)
    assert [a.hca for a in plan.affinity][:4] == ["mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5"]
    assert plan.affinity[4].hca != "mlx5_6" and plan.affinity[5].pci_hops == 4


def test_roce_picks_the_only_v2_ipv4_gid() -> None:
    plan = plan_for("roce-gid3")
    assert plan.transport == "roce"
    assert plan.to_export() == {
        **BASE,
        "NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1",
        "NCCL_IB_GID_INDEX": "3",
    }
    assert (
        codes(plan) == ["ipc-lock"] and plan.findings[0].severity == "info"
    )  # memlock is unlimited
    assert [a.hca for a in plan.affinity] == [
        "mlx5_0",
        "mlx5_1",
    ]  # each GPU with its own root complex


def test_roce_gid_indexes_that_differ_fall_back_to_address_family() -> None:
    m = load_machine("roce-gid3")
    resources = discover(HostPaths(**m.paths), {})
    second = resources.hcas[1]
    port = second.ports[0]
    moved = tuple(dataclasses.replace(g, index=g.index + 2) for g in port.gids)
    hcas = (
        resources.hcas[0],
        dataclasses.replace(second, ports=(dataclasses.replace(port, gids=moved),)),
    )
    plan = build_plan(dataclasses.replace(resources, hcas=hcas), {})
    exported = plan.to_export()
    assert "NCCL_IB_GID_INDEX" not in exported
    assert (
        exported["NCCL_IB_ROCE_VERSION_NUM"] == "2" and exported["NCCL_IB_ADDR_FAMILY"] == "AF_INET"
    )


def test_sriov_uses_only_the_vfs_given_to_the_pod() -> None:
    plan = plan_for("sriov-vf")
    assert plan.to_export() == {
        **BASE,
        "NCCL_IB_HCA": "=mlx5_1:1,mlx5_6:1",
        "NCCL_IB_GID_INDEX": "3",
    }
    reason = next(s.reason for s in plan.settings if s.name == "NCCL_IB_HCA")
    assert "PCIDEVICE_NVIDIA_COM_SRIOV_RDMA_A" in reason and "network-status" in reason
    assert codes(plan) == []
    assert [(a.hca, a.same_numa) for a in plan.affinity] == [("mlx5_1", True), ("mlx5_6", True)]


def test_sriov_vf_without_rdma_device_is_reported() -> None:
    plan = plan_for("sriov-vf", {"PCIDEVICE_OPENSHIFT_IO_NETDEV": "0000:5e:00.4"})
    finding = next(f for f in plan.findings if f.code == "allocated-not-rdma")
    assert "0000:5e:00.4" in finding.message and "isRdma" in finding.fix
    assert plan.hcas == ("mlx5_1:1", "mlx5_6:1")


def test_non_rdma_sriov_network_beside_shared_hcas() -> None:
    # A netdevice SR-IOV network for storage; the HCAs come from the RDMA shared device plugin.
    plan = plan_for("dgx-h100-ib8", {"PCIDEVICE_INTEL_COM_STORAGE": "0000:5e:02.1"})
    assert len(plan.hcas) == 7 and "allocated-not-rdma" not in codes(plan)


def test_given_vf_whose_verbs_device_was_not_mounted(tmp_path) -> None:
    m = load_machine("sriov-vf")
    tree = tmp_path / "tree"
    shutil.copytree(m.root, tree, symlinks=True)
    mlx5_6 = tree / "sys/class/infiniband_verbs"
    uverbs = next(p.name for p in mlx5_6.iterdir() if (p / "ibdev").read_text().strip() == "mlx5_6")
    (tree / "dev/infiniband" / uverbs).unlink()
    plan = build_plan(discover(HostPaths(root=str(tree)), m.env), m.env)
    assert plan.hcas == ("mlx5_1:1",)
    finding = next(f for f in plan.findings if f.code == "uverbs-missing")
    assert f"/dev/infiniband/{uverbs}" in finding.message


def test_no_rdma_falls_back_to_tcp_and_flags_tiny_shm() -> None:
    plan = plan_for("no-rdma")
    assert plan.transport == "tcp" and not plan.rdma_usable
    assert plan.to_export() == {**BASE, "NCCL_IB_DISABLE": "1"}
    assert codes(plan) == ["no-rdma-devices", "shm"]
    assert "64 MiB" in plan.findings[1].message and "medium: Memory" in plan.findings[1].fix
    assert plan.errors == ()


def test_memlock_64k_makes_rdma_unusable_with_a_fix() -> None:
    plan = plan_for("memlock-64k")
    assert plan.transport == "tcp"
    assert plan.to_export() == {**BASE, "NCCL_IB_DISABLE": "1"}
    assert codes(plan, "error") == ["memlock"] and codes(plan, "warning") == ["ipc-lock"]
    memlock = plan.errors[0]
    assert "64 KiB" in memlock.message and "IPC_LOCK" in memlock.fix and "unlimited" in memlock.fix
    assert "memlock" in next(s.reason for s in plan.settings if s.name == "NCCL_IB_DISABLE")


def test_ipc_lock_lifts_the_memlock_limit() -> None:
    m = load_machine("memlock-64k")
    resources = dataclasses.replace(discover(HostPaths(**m.paths), {}), cap_ipc_lock=True)
    plan = build_plan(resources, {})
    assert plan.transport == "infiniband" and plan.errors == ()


def test_missing_verbs_library_and_provider() -> None:
    plan = plan_for("dgx-h100-ib8", lib_dirs=())
    assert codes(plan, "error") == ["no-verbs-library"] and plan.transport == "tcp"
    assert "apt-get install libibverbs1 ibverbs-providers" in plan.errors[0].fix
    m = load_machine("dgx-h100-ib8")
    resources = dataclasses.replace(discover(HostPaths(**m.paths), {}), verbs_providers=("efa",))
    assert codes(build_plan(resources, {}), "error") == ["no-verbs-provider"]


def test_hcas_in_sysfs_without_dev_infiniband(tmp_path) -> None:
    m = load_machine("roce-gid3")
    shutil.copytree(m.root, tmp_path / "tree", symlinks=True)
    shutil.rmtree(tmp_path / "tree" / "dev" / "infiniband")
    resources = discover(HostPaths(root=str(tmp_path / "tree")), {})
    plan = build_plan(resources, {})
    assert "no-dev-infiniband" in codes(plan, "error") and plan.transport == "tcp"


def test_cpu_pod_warns_no_gpu() -> None:
    plan = plan_for("cpu-only")
    assert "no-gpu" in codes(plan, "warning") and plan.transport == "tcp"


def test_aws_efa_defers_to_its_plugin() -> None:
    plan = plan_for("aws-efa")
    assert plan.profile == "aws-efa" and plan.transport == "efa"
    exported = plan.to_export()
    assert (
        exported["FI_PROVIDER"] == "efa"
        and "NCCL_IB_HCA" not in exported
        and "NCCL_IB_DISABLE" not in exported
    )
    assert all(s.source == "platform" for s in plan.settings if s.name.startswith("FI_"))
    m = load_machine("aws-efa")
    resources = dataclasses.replace(discover(HostPaths(**m.paths), {}), nccl_net_plugin="")
    plan = build_plan(resources, {})
    assert codes(plan, "error") == ["efa-no-plugin"] and plan.transport == "tcp"


def test_vendor_files_are_platform_settings(tmp_path) -> None:
    m = load_machine("roce-gid3")
    tree = tmp_path / "tree"
    shutil.copytree(m.root, tree, symlinks=True)
    (tree / "etc/nccl.conf").write_text("NCCL_IB_GID_INDEX=5\nNCCL_IB_TC=106\n")
    (tree / "opt/microsoft").mkdir(parents=True)
    (tree / "opt/microsoft/ndv5-topo.xml").write_text("<system/>")
    plan = build_plan(discover(HostPaths(root=str(tree)), {}), {})
    by_name = {s.name: s for s in plan.settings}
    assert (
        by_name["NCCL_IB_GID_INDEX"].value == "5"
        and by_name["NCCL_IB_GID_INDEX"].source == "platform"
    )
    assert (
        by_name["NCCL_IB_TC"].source == "platform" and "nccl.conf" in by_name["NCCL_IB_TC"].reason
    )
    assert by_name["NCCL_TOPO_FILE"].value.endswith("opt/microsoft/ndv5-topo.xml")
    assert by_name["NCCL_IB_HCA"].source == "detected"
    assert plan.profile == "azure-nd"


def test_user_settings_are_kept_and_explained() -> None:
    plan = plan_for(
        "dgx-h100-ib8",
        {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_BUFFSIZE": "8388608"},
    )
    by_name = {s.name: s for s in plan.settings}
    assert (
        by_name["NCCL_IB_HCA"].source == "user" and by_name["NCCL_IB_HCA"].value == "mlx5_0,mlx5_1"
    )
    assert "=mlx5_0:1" in by_name["NCCL_IB_HCA"].reason  # what trainkit would have chosen
    assert by_name["NCCL_BUFFSIZE"].source == "user"
    assert "NCCL_IB_HCA" not in plan.to_export() and "NCCL_SOCKET_IFNAME" not in plan.to_export()
    prefix = next(f for f in plan.findings if f.code == "hca-prefix-match")
    assert "mlx5_1 also selects mlx5_10, mlx5_11" in prefix.message
    assert "NCCL_IB_HCA==mlx5_0,mlx5_1" in prefix.fix


def test_exact_match_user_hca_is_not_flagged() -> None:
    plan = plan_for("dgx-h100-ib8", {"NCCL_IB_HCA": "=mlx5_1:1"})
    assert "hca-prefix-match" not in codes(plan)


def test_user_gid_index_pointing_at_roce_v1_is_flagged() -> None:
    plan = plan_for("roce-gid3", {"NCCL_IB_GID_INDEX": "2"})
    finding = next(f for f in plan.findings if f.code == "gid-index")
    assert "IB/RoCE v1" in finding.message and finding.fix == "use NCCL_IB_GID_INDEX=3"
    assert "gid-index" not in codes(plan_for("roce-gid3", {"NCCL_IB_GID_INDEX": "3"}))


@pytest.mark.parametrize(
    ("name", "value", "flagged"),
    [
        ("NCCL_DEBUG", "INFO", True),
        ("NCCL_DEBUG", "WARN", False),
        ("TORCH_DISTRIBUTED_DEBUG", "DETAIL", True),
        ("NCCL_P2P_DISABLE", "1", True),
        ("CUDA_LAUNCH_BLOCKING", "0", False),
    ],
)
def test_debug_variables_left_set_are_warned(name: str, value: str, flagged: bool) -> None:
    plan = plan_for("dgx-h100-ib8", {name: value})
    assert ("debug-variable" in codes(plan, "warning")) is flagged


def test_user_disabling_ib_on_a_usable_pod_is_warned() -> None:
    plan = plan_for("dgx-h100-ib8", {"NCCL_IB_DISABLE": "1"})
    assert "ib-disabled" in codes(plan) and plan.to_export().get("NCCL_IB_DISABLE") is None


def test_require_rdma_turns_fallback_into_an_error() -> None:
    assert "require-rdma" in codes(plan_for("no-rdma", {"TRAINKIT_REQUIRE_RDMA": "1"}), "error")
    assert "require-rdma" not in codes(plan_for("dgx-h100-ib8", {"TRAINKIT_REQUIRE_RDMA": "1"}))


def test_format_fits_one_screen() -> None:
    text = plan_for("dgx-h100-ib8").format()
    assert (
        "NCCL_IB_HCA==mlx5_0:1" in text and "[detected]" in text and "WARNING [port-down]" in text
    )
    assert len(text.splitlines()) < 25


def test_gpu_to_hca_links_use_nvidia_smi_topology_names() -> None:
    dgx = plan_for("dgx-h100-ib8").affinity
    assert dgx[0].link == "PIX" and dgx[0].pci_hops == 4
    assert dgx[4].link == "NODE" and dgx[4].same_numa  # its switch-mate mlx5_6 is down
    assert [a.link for a in plan_for("roce-gid3").affinity] == ["PHB", "PHB"]  # same root complex
    assert [a.link for a in plan_for("sriov-vf").affinity] == ["PIX", "PIX"]


def test_hcas_only_on_the_other_socket_are_flagged() -> None:
    m = load_machine("dgx-h100-ib8")
    resources = discover(HostPaths(**m.paths), {})
    numa0_gpus = tuple(gpu for gpu in resources.gpus if gpu.numa_node == 0)
    numa1_uverbs = tuple(hca.uverbs for hca in resources.hcas if hca.numa_node == 1)
    plan = build_plan(
        dataclasses.replace(resources, gpus=numa0_gpus, dev_infiniband=(*numa1_uverbs, "rdma_cm")),
        {},
    )
    finding = next(f for f in plan.findings if f.code == "cross-numa")
    assert finding.severity == "warning" and finding.message.startswith("GPU0, GPU1, GPU2, GPU3")
    assert {a.link for a in plan.affinity} == {"SYS"}


def test_efa_software_without_efa_devices(tmp_path) -> None:
    m = load_machine("no-rdma")
    tree = tmp_path / "tree"
    shutil.copytree(m.root, tree, symlinks=True)
    (tree / "opt/amazon/efa/lib").mkdir(parents=True)
    plan = build_plan(discover(HostPaths(root=str(tree), shm_bytes=m.shm_bytes), {}), {})
    assert "efa-not-given" in codes(plan, "warning") and plan.transport == "tcp"
    assert plan.profile == "generic"
    assert "vpc.amazonaws.com/efa" in next(
        f.fix for f in plan.findings if f.code == "efa-not-given"
    )
    assert plan.to_export()["NCCL_IB_DISABLE"] == "1"
