"""The worker environment trainkit-ray builds, in one process: torchrun's names and values, and a
World read from it that matches the Ray Train placement. (Pure: no Ray, no processes.)"""

from __future__ import annotations

import pytest

from launchers.ray.env import WorkerPlace, forwarded_variables, torchrun_worker_env
from trainkit.world import World


def place(**overrides: object) -> WorkerPlace:
    fields: dict[str, object] = dict(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        node_rank=1,
        num_nodes=2,
        master_addr="10.0.0.5",
        master_port=29400,
        restart_count=2,
        max_restarts=3,
        run_id="job-7",
    )
    return WorkerPlace(**{**fields, **overrides})  # type: ignore[arg-type]


def test_environment_has_torchruns_names_and_reads_back_as_the_same_world() -> None:
    env = torchrun_worker_env(place(), error_file="/tmp/e.json", driver_env={})
    assert env["GROUP_RANK"] == "1" and env["GROUP_WORLD_SIZE"] == "2"
    assert (
        env["ROLE_RANK"] == "3" and env["ROLE_WORLD_SIZE"] == "4" and env["ROLE_NAME"] == "default"
    )
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert env["TORCHELASTIC_ERROR_FILE"] == "/tmp/e.json"
    assert env["OMP_NUM_THREADS"] == "1", "torchrun's default when workers share a node"
    world = World.from_env(env)
    assert (
        world
        == World(
            rank=3,
            world_size=4,
            local_rank=1,
            local_world_size=2,
            node_rank=1,
            num_nodes=2,
            master_addr="10.0.0.5",
            master_port=29400,
            restart_count=2,
            run_id="job-7",
            source="torchrun",
            use_agent_store=True,  # rank 0's Ray worker hosts the attempt's store, as torchrun's agent does
        )
    )


@pytest.mark.parametrize(
    ("local_world_size", "driver_env", "expected"),
    [(1, {}, None), (2, {"OMP_NUM_THREADS": "4"}, "4"), (1, {"OMP_NUM_THREADS": "3"}, "3")],
)
def test_omp_threads_follow_torchrun(
    local_world_size: int, driver_env: dict[str, str], expected: str | None
) -> None:
    env = torchrun_worker_env(
        place(local_rank=0, local_world_size=local_world_size), error_file="", driver_env=driver_env
    )
    assert env.get("OMP_NUM_THREADS") == expected


def test_the_users_nccl_error_handling_wins() -> None:
    env = torchrun_worker_env(
        place(), error_file="", driver_env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    )
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_forwarded_variables_leave_node_local_and_launcher_state_behind() -> None:
    driver = {
        "TRAINKIT_GRACE_PERIOD_S": "50",
        "NCCL_DEBUG": "INFO",
        "GLOO_SOCKET_IFNAME": "eth0",
        "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        "OMP_NUM_THREADS": "2",
        "TORCHELASTIC_RUN_ID": "stale",
        "TRAINKIT_EXIT_STATUS_DIR": "/tmp/driver-only",
        "TRAINKIT_METRICS_DIR": "/dev/shm/driver-only",
        "HOME": "/root",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert forwarded_variables(driver) == {
        "TRAINKIT_GRACE_PERIOD_S": "50",
        "NCCL_DEBUG": "INFO",
        "GLOO_SOCKET_IFNAME": "eth0",
        "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        "OMP_NUM_THREADS": "2",
    }
