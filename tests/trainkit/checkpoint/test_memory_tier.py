"""The memory tier in one process: tier choice as a pure function, the ring, snapshots round trip
through /dev/shm-style directories, partial snapshots stay invisible, and /dev/shm sizing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.trainkit.checkpoint.states import assert_same_params, make_state, params, train
from trainkit.checkpoint import CheckpointManager
from trainkit.checkpoint.commit import COMMIT_NAME
from trainkit.checkpoint.memory_tier import MemorySpaceError, memory_bytes_needed, owner_name
from trainkit.checkpoint.replication import ring_target
from trainkit.checkpoint.tiers import RankHoldings, RestoreChoice, choose_restore
from trainkit.env_vars import MEMORY_ROOT_VARIABLE, read_replica_address

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

A, B = ("10.0.0.1", 29600), ("10.0.0.2", 29600)


def test_every_rank_in_own_memory_restores_the_newest_common_step() -> None:
    holdings = [RankHoldings.of({10, 20, 30}), RankHoldings.of({20, 30}), RankHoldings.of({20})]
    assert choose_restore(holdings, storage_steps=[10]) == RestoreChoice("memory", 20, {})


def test_a_replacement_pod_pulls_its_ranks_from_the_peer_holding_them() -> None:
    holdings = [RankHoldings.of({20, 30}), RankHoldings.of((), {20: A, 30: B})]
    choice = choose_restore(holdings, storage_steps=[0])
    assert choice == RestoreChoice("memory", 30, {1: B})
    assert [choice.rank_tier(rank) for rank in range(2)] == ["memory", "peer"]


def test_storage_only_when_no_memory_copy_is_complete_or_storage_is_newer() -> None:
    lost = [RankHoldings.of({20}), RankHoldings.of()]
    assert choose_restore(lost, storage_steps=[10, 15]) == RestoreChoice("storage", 15)
    assert choose_restore(lost, storage_steps=[]) == RestoreChoice("storage", None)
    preempted = [RankHoldings.of({20}), RankHoldings.of({20})]
    assert choose_restore(preempted, storage_steps=[23]).rank_tier(0) == "storage"
    assert choose_restore(preempted, storage_steps=[20]).tier == "memory"  # tie: memory is faster


def test_ring_pushes_to_the_next_node_and_wraps() -> None:
    servers = {0: A, 1: B, 3: ("10.0.0.4", 1)}
    assert ring_target(0, servers) == B
    assert ring_target(1, servers) == ("10.0.0.4", 1)
    assert ring_target(3, servers) == A
    assert ring_target(0, {0: A}) is None and ring_target(2, servers) is None


def test_sizing_counts_snapshots_being_written_and_replicas() -> None:
    assert memory_bytes_needed(100, num_local_ranks=2, keep=2, replicated=False) == 600
    assert memory_bytes_needed(100, num_local_ranks=2, keep=2, replicated=True) == 1200
    assert owner_name(3, 8) == "rank-3-of-8"
    assert (
        owner_name(3, 8, "s3://b/run/") == owner_name(3, 8, "s3://b/run") != owner_name(3, 8, "/x")
    )


def test_replica_address_is_host_and_port() -> None:
    assert read_replica_address({}) is None
    assert read_replica_address({"TRAINKIT_REPLICA_ADDRESS": "10.1.2.3:29600"}) == (
        "10.1.2.3",
        29600,
    )
    with pytest.raises(ValueError, match=r"TRAINKIT_REPLICA_ADDRESS='10.1.2.3'.*HOST:PORT"):
        read_replica_address({"TRAINKIT_REPLICA_ADDRESS": "10.1.2.3"})


def memory_manager(storage: Path, memory: Path, monkeypatch: pytest.MonkeyPatch, **options):
    monkeypatch.setenv(MEMORY_ROOT_VARIABLE, str(memory))
    return CheckpointManager(storage, signals=None, memory_interval_steps=2, **options)


def test_memory_snapshots_restore_without_storage_and_keep_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, memory = tmp_path / "storage", tmp_path / "shm"
    state = make_state(0)
    saved = {}
    with memory_manager(storage, memory, monkeypatch, interval_steps=4, memory_keep=2) as ckpt:
        for step in range(1, 8):
            train(state, 1)
            assert ckpt.maybe_save(step, state) == (step % 2 == 0)
            ckpt.memory.wait()
            saved[step] = (params(state), state["loader"].position, state["data_rng"].get_state())
        assert ckpt.memory.tier.committed_steps() == [4, 6]  # memory_keep bounds the snapshots
        assert ckpt.committed_steps() == [4]
    fresh = make_state(1)
    with memory_manager(storage, memory, monkeypatch) as ckpt:
        assert ckpt.restore(fresh) == 6
        assert ckpt.memory.last_restore["tier"] == "memory"
    assert_same_params(params(fresh), saved[6][0])
    assert fresh["loader"].position == saved[6][1]
    assert torch.equal(fresh["data_rng"].get_state(), saved[6][2])


def test_a_partial_snapshot_is_invisible_and_losing_memory_falls_back_to_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, memory = tmp_path / "storage", tmp_path / "shm"
    state = make_state(0)
    with memory_manager(storage, memory, monkeypatch, interval_steps=4) as ckpt:
        for step in range(1, 7):
            train(state, 1)
            ckpt.maybe_save(step, state)
            ckpt.memory.wait()
            if step == 4:
                at_four = params(state)
    step_six = ckpt.memory.tier.step_directory(6)
    os.remove(os.path.join(step_six, COMMIT_NAME))  # a snapshot killed before its record
    fresh = make_state(1)
    with memory_manager(storage, memory, monkeypatch) as ckpt:
        assert ckpt.restore(fresh) == 4 and ckpt.memory.last_restore["tier"] == "memory"
    assert_same_params(params(fresh), at_four)

    owner_dir = Path(ckpt.memory.tier.directory)
    assert owner_dir.name == owner_name(0, 1, str(storage))
    for name in os.listdir(owner_dir):
        (owner_dir / name / COMMIT_NAME).unlink(missing_ok=True)
    fresh = make_state(2)
    with memory_manager(storage, memory, monkeypatch) as ckpt:
        with pytest.warns(UserWarning, match="no step has a complete memory copy.*storage tier"):
            assert ckpt.restore(fresh) == 4
        assert ckpt.memory.last_restore["tier"] == "storage"
    assert_same_params(params(fresh), at_four)


def test_a_too_small_dev_shm_is_refused_naming_the_size_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        "trainkit.checkpoint.memory_tier.shutil.disk_usage",
        lambda path: usage._replace(total=1000),
    )
    state = make_state(0)
    with (
        memory_manager(tmp_path / "storage", tmp_path / "shm", monkeypatch) as ckpt,
        pytest.raises(MemorySpaceError, match=r"need [\d.]+ KiB .*holds 1000 B.*sizeLimit"),
    ):
        ckpt.restore(state)


def test_trainkit_run_pod_memory_serves_replicas_and_is_removed_at_job_end() -> None:
    from launchers.memory_tier import start_pod_memory
    from trainkit.checkpoint.peer import list_snapshots

    token = "pod-memory-token-0123456789abcdef"
    env = {"TRAINKIT_JOB_TOKEN": token, "POD_IP": "127.0.0.1"}
    memory = start_pod_memory("run/1", env, port=0)
    try:
        worker_env = memory.worker_env()
        root = worker_env[MEMORY_ROOT_VARIABLE]
        assert os.path.isdir(root) and os.path.basename(os.path.dirname(root)).startswith(
            "trainkit-run_1-"
        )
        address = read_replica_address(worker_env)
        assert address is not None and address[0] == "127.0.0.1"
        assert list_snapshots(address, token.encode(), owner="rank-0-of-2") == []
    finally:
        memory.close()
    assert not os.path.exists(os.path.dirname(root))
    plain = start_pod_memory("run2", {})
    assert plain.server is None and "TRAINKIT_REPLICA_ADDRESS" not in plain.worker_env()
    plain.close()


def test_tier_metrics_count_restores_by_tier_and_the_replication_lag(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from tests.trainkit.metrics.jobs import parse_exposition
    from trainkit.metrics.collector import PodCollector
    from trainkit.metrics.recorder import Recorder
    from trainkit.world import World

    def worker(local_rank: int) -> Recorder:
        return Recorder(
            tmp_path,
            World(rank=local_rank, world_size=2, local_rank=local_rank, local_world_size=2),
        )

    first, second = worker(0), worker(1)
    first.observe_checkpoint_tier("memory", "restore", num_bytes=1000, seconds=0.5)
    second.observe_checkpoint_tier("peer", "restore", num_bytes=3000, seconds=1.5)
    second.observe_checkpoint_tier("peer", "save", num_bytes=3000, seconds=1.0, lag_steps=4)
    with pytest.raises(ValueError, match="unknown tier/operation disk/restore"):
        first.observe_checkpoint_tier("disk", "restore", num_bytes=1, seconds=1)
    registry = CollectorRegistry()
    registry.register(PodCollector(tmp_path, job_start_unix_s=0.0))
    samples = parse_exposition(generate_latest(registry).decode())

    def series(name: str, tier: str, operation: str) -> float:
        return samples[f'{name}{{operation="{operation}",tier="{tier}"}}']

    assert series("trainkit_checkpoint_tier_operations_total", "memory", "restore") == 1
    assert series("trainkit_checkpoint_tier_operations_total", "peer", "restore") == 1
    assert series("trainkit_checkpoint_tier_operations_total", "storage", "restore") == 0
    assert series("trainkit_checkpoint_tier_bytes_total", "peer", "restore") == 3000
    assert series("trainkit_checkpoint_tier_seconds_total", "peer", "save") == 1.0
    assert samples["trainkit_checkpoint_replication_lag_steps"] == 4
    first.close()
    second.close()


def test_a_replica_port_the_user_chose_that_is_taken_stops_trainkit_run() -> None:
    import socket

    from launchers.memory_tier import start_pod_memory

    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = {
            "TRAINKIT_JOB_TOKEN": "pod-memory-token-0123456789abcdef",
            "POD_IP": "127.0.0.1",
            "TRAINKIT_REPLICA_PORT": str(taken.getsockname()[1]),
        }
        with pytest.raises(OSError, match="in use"):
            start_pod_memory("taken", env)
