"""The RDMA selection on its own: a frozen value with the ports, the variables and the findings."""

from __future__ import annotations

import dataclasses

import pytest

from tests.trainkit.comms.conftest import load_machine
from trainkit.comms.discovery import HostPaths, PodResources, discover
from trainkit.comms.rdma import RdmaSelection, gpu_hca_affinity, select_rdma


def resources_of(name: str) -> PodResources:
    machine = load_machine(name)
    return discover(HostPaths(**machine.paths), machine.env)


def test_usable_infiniband_lists_active_ports_and_proposes_an_exact_hca_list() -> None:
    resources = resources_of("dgx-h100-ib8")
    selection = select_rdma(resources)
    assert selection.transport == "infiniband" and "mlx5_6:1" not in selection.hcas
    assert [p.name for p in selection.settings] == ["NCCL_IB_HCA"]
    assert selection.settings[0].value == "=" + ",".join(selection.hcas)
    assert [f.code for f in selection.findings] == ["port-down"]
    assert {hca.name for hca in selection.selected} == {e.split(":")[0] for e in selection.hcas}
    assert len(gpu_hca_affinity(resources, selection.selected)) == len(resources.gpus)
    with pytest.raises(dataclasses.FrozenInstanceError):
        selection.transport = "tcp"  # type: ignore[misc]


def test_unusable_rdma_is_tcp_with_nothing_selected_and_every_reason() -> None:
    selection = select_rdma(resources_of("memlock-64k"))
    assert selection == RdmaSelection(transport="tcp", findings=selection.findings)
    assert "memlock" in [f.code for f in selection.findings]
