"""apply_plan: sets only what the user left unset, is idempotent, never touches the network."""

from __future__ import annotations

import pickle
import socket

import pytest

from tests.trainkit.comms.conftest import load_machine
from trainkit.comms import APPLIED_VARIABLE, RDMARequiredError, apply_plan, compute_plan


def test_sets_missing_variables_and_records_them() -> None:
    m = load_machine("dgx-h100-ib8")
    env = dict(m.env)
    plan = apply_plan(env, **m.paths)
    assert env["NCCL_IB_HCA"].startswith("=mlx5_0:1,") and env["NCCL_SOCKET_IFNAME"] == "=eth0"
    assert set(env[APPLIED_VARIABLE].split(",")) == set(plan.to_export())


def test_never_overrides_the_user() -> None:
    m = load_machine("roce-gid3")
    env = {"NCCL_IB_GID_INDEX": "1", "NCCL_SOCKET_IFNAME": "bond0"}
    plan = apply_plan(env, **m.paths)
    assert env["NCCL_IB_GID_INDEX"] == "1" and env["NCCL_SOCKET_IFNAME"] == "bond0"
    assert env["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1"
    assert "NCCL_IB_GID_INDEX" not in env[APPLIED_VARIABLE].split(",")
    assert {s.name: s.source for s in plan.settings}["NCCL_IB_GID_INDEX"] == "user"


def test_second_apply_knows_its_own_variables() -> None:
    # trainkit-run applies in the agent, trainkit.init() again in each worker.
    m = load_machine("sriov-vf")
    env = dict(m.env)
    apply_plan(env, **m.paths)
    before = dict(env)
    plan = apply_plan(env, **m.paths)
    assert env == before
    sources = {s.name: s.source for s in plan.settings}
    assert sources["NCCL_IB_HCA"] == "detected" and sources["NCCL_IB_GID_INDEX"] == "detected"


def test_require_rdma_raises_a_value_error_and_leaves_env_alone() -> None:
    m = load_machine("memlock-64k")
    env = {"TRAINKIT_REQUIRE_RDMA": "1"}
    with pytest.raises(RDMARequiredError) as raised:
        apply_plan(env, **m.paths)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert (
        "memlock limit is 64 KiB" in message
        and "IPC_LOCK" in message
        and "trainkit doctor" in message
    )
    assert env == {"TRAINKIT_REQUIRE_RDMA": "1"}
    assert raised.value.plan.transport == "tcp"
    copy = pickle.loads(pickle.dumps(raised.value))  # as torch gathers a worker's error
    assert type(copy) is RDMARequiredError and str(copy) == message
    # Accepted when RDMA is fine.
    apply_plan({"TRAINKIT_REQUIRE_RDMA": "1"}, **load_machine("dgx-h100-ib8").paths)


def test_apply_does_not_touch_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("apply_plan opened a socket or resolved a name")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    for name in ("dgx-h100-ib8", "sriov-vf", "no-rdma", "aws-efa"):
        m = load_machine(name)
        apply_plan(dict(m.env), **m.paths)


def test_compute_plan_does_not_mutate() -> None:
    m = load_machine("roce-gid3")
    env: dict[str, str] = {}
    compute_plan(env, **m.paths)
    assert env == {}


def test_runs_on_this_host_without_error() -> None:
    # The real /sys, /proc and /dev of the test machine: whatever it has, the plan is well-formed.
    env: dict[str, str] = {}
    plan = apply_plan(env)
    assert plan.transport in ("tcp", "infiniband", "roce", "infiniband+roce", "efa")
    assert all(env[name] == value for name, value in plan.to_export().items())


def test_torchrun_worker_default_is_not_mistaken_for_the_user() -> None:
    m = load_machine("roce-gid3")
    env = {"TORCHELASTIC_RUN_ID": "job", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    sources = {s.name: s.source for s in compute_plan(env, **m.paths).settings}
    assert sources["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "platform"
    env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
    sources = {s.name: s.source for s in compute_plan(env, **m.paths).settings}
    assert sources["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "user"


def test_a_require_rdma_value_other_than_0_or_1_is_refused_before_anything_is_set() -> None:
    # "true" used to mean "not required" without a word; the job then ran on TCP.
    env = {"TRAINKIT_REQUIRE_RDMA": "true"}
    with pytest.raises(ValueError, match=r"TRAINKIT_REQUIRE_RDMA='true': expected 1 .* or 0"):
        apply_plan(env, **load_machine("no-rdma").paths)
    assert env == {"TRAINKIT_REQUIRE_RDMA": "true"}
