"""World.from_env for each launcher's environment, as those launchers really set it."""

from __future__ import annotations

import re

import pytest

from trainkit.world import World

# What torchrun 2.x puts into worker 3 of a 2-node x 2-process job (from a captured worker env).
TORCHRUN_WORKER = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "ROLE_RANK": "3",
    "ROLE_NAME": "default",
    "ROLE_WORLD_SIZE": "4",
    "MASTER_ADDR": "trainer-0.trainer.ml.svc.cluster.local",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RESTART_COUNT": "2",
    "TORCHELASTIC_MAX_RESTARTS": "3",
    "TORCHELASTIC_RUN_ID": "job-7",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "PET_NNODES": "2",
    "PET_NPROC_PER_NODE": "2",  # left over from the pod: torchrun's wins
}

# Kubeflow PyTorchJob worker 1 (replica index 2: Master is 0), one process per pod, no torchrun.
PYTORCHJOB_POD = {
    "MASTER_ADDR": "mnist-master-0",
    "MASTER_PORT": "23456",
    "WORLD_SIZE": "3",
    "RANK": "2",
    "PET_MASTER_ADDR": "mnist-master-0",
    "PET_MASTER_PORT": "23456",
    "PET_NNODES": "3",
    "PET_NPROC_PER_NODE": "1",
    "PET_NODE_RANK": "2",
    "PYTHONUNBUFFERED": "1",
}

# Kubeflow Trainer TrainJob node 1 of 4 (torch runtime), process started directly.
TRAINJOB_POD = {
    "PET_NNODES": "4",
    "PET_NPROC_PER_NODE": "1",
    "PET_NODE_RANK": "1",
    "PET_MASTER_ADDR": "job-node-0-0.job",
    "PET_MASTER_PORT": "29400",
}

# Ray Train TorchTrainer worker: rank 5 of 8 on the third node, 2 workers per node.
RAY_WORKER = {
    "RANK": "5",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "2",
    "NODE_RANK": "2",
    "MASTER_ADDR": "10.0.3.4",
    "MASTER_PORT": "41234",
}

INDEXED_JOB_POD = {
    "JOB_COMPLETION_INDEX": "3",
    "TRAINKIT_NNODES": "4",
    "MASTER_ADDR": "train-0.train",
    "MASTER_PORT": "29500",
    "JOB_NAME": "train",
}


def test_torchrun_worker_environment() -> None:
    world = World.from_env(TORCHRUN_WORKER)
    assert world == World(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        node_rank=1,
        num_nodes=2,
        master_addr="trainer-0.trainer.ml.svc.cluster.local",
        master_port=29400,
        restart_count=2,
        run_id="job-7",
        source="torchrun",
        use_agent_store=True,
    )
    assert not world.is_main


def test_pytorchjob_pod_without_launcher() -> None:
    world = World.from_env(PYTORCHJOB_POD)
    assert (world.source, world.rank, world.world_size, world.node_rank, world.num_nodes) == (
        "pytorchjob",
        2,
        3,
        2,
        3,
    )
    assert (world.master_addr, world.master_port) == ("mnist-master-0", 23456)


def test_trainjob_pod_uses_pet_variables() -> None:
    world = World.from_env(TRAINJOB_POD)
    assert (world.source, world.rank, world.world_size, world.master_addr, world.master_port) == (
        "pytorchjob",
        1,
        4,
        "job-node-0-0.job",
        29400,
    )


def test_pytorchjob_with_several_processes_needs_a_launcher() -> None:
    with pytest.raises(ValueError, match=r"PET_NPROC_PER_NODE=4.*trainkit-run"):
        World.from_env({**TRAINJOB_POD, "PET_NPROC_PER_NODE": "4"})


def test_ray_train_worker() -> None:
    world = World.from_env(RAY_WORKER)
    assert (world.source, world.rank, world.local_rank, world.node_rank, world.num_nodes) == (
        "ray",
        5,
        1,
        2,
        4,
    )


def test_indexed_job_pod() -> None:
    world = World.from_env(INDEXED_JOB_POD)
    assert (world.source, world.rank, world.world_size, world.run_id) == (
        "indexed-job",
        3,
        4,
        "train",
    )


def test_indexed_job_without_node_count_names_the_variable() -> None:
    with pytest.raises(ValueError, match="TRAINKIT_NNODES"):
        World.from_env({"JOB_COMPLETION_INDEX": "0"})


def test_bare_rank_and_world_size() -> None:
    world = World.from_env(
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    )
    assert (world.source, world.rank, world.world_size, world.master_addr) == ("env", 1, 2, "h")


def test_bare_script_is_a_world_of_one() -> None:
    world = World.from_env({"HOME": "/root", "PATH": "/usr/bin"})
    assert world == World()
    assert world.source == "single" and world.is_main


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": "4"}, r"rank \(4\) must be in \[0, world_size=4\).*RANK=4.*WORLD_SIZE=4"),
        ({"LOCAL_RANK": "2"}, r"local_rank \(2\).*LOCAL_RANK=2"),
        ({"LOCAL_RANK": "one"}, r"LOCAL_RANK='one' is not an integer"),
        ({"MASTER_PORT": "70000"}, r"master_port \(70000\)"),
        ({"GROUP_RANK": "2"}, r"node_rank \(2\) must be in \[0, num_nodes=2\)"),
    ],
)
def test_contradictions_name_variables_and_values(change: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        World.from_env({**TORCHRUN_WORKER, **change})


def test_world_is_frozen_and_keyword_only() -> None:
    world = World(rank=1, world_size=4)
    with pytest.raises(AttributeError):
        world.rank = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        World(1, 4)  # type: ignore[misc]


def test_agent_store_flag_is_read_only_from_torchruns_literal_true() -> None:
    assert World.from_env(TORCHRUN_WORKER).use_agent_store is True
    for value in ("False", "1", ""):
        world = World.from_env({**TORCHRUN_WORKER, "TORCHELASTIC_USE_AGENT_STORE": value})
        assert world.use_agent_store is False, value
    assert World(rank=1, world_size=4).use_agent_store is False


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({**INDEXED_JOB_POD, "TRAINKIT_NNODES": "2:4"}, "TRAINKIT_NNODES='2:4'"),
        ({**TRAINJOB_POD, "PET_NNODES": "1:4"}, "PET_NNODES='1:4'"),
    ],
)
def test_an_elastic_node_range_without_a_launcher_is_refused(
    env: dict[str, str], name: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(name) + ".*elastic range.*trainkit-run"):
        World.from_env(env)
