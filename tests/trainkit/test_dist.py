"""Backend choice and the process-group life cycle of trainkit.init() in one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainkit.dist import resolve_backend


def test_auto_backend_is_gloo_on_cpu_and_a_device_map_with_cuda() -> None:
    assert resolve_backend("auto", cuda_available=False) == "gloo"
    assert resolve_backend("auto", cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert resolve_backend("gloo", cuda_available=True) == "gloo"


def test_nccl_without_cuda_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"needs CUDA.*backend='auto' or 'gloo'"):
        resolve_backend("nccl", cuda_available=False)


# The checkout under test, so the child imports this code and not an installed copy.
REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # No launcher variables: whatever the child joins must come from the World it is given.
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_import_has_no_side_effects() -> None:
    result = run_python(
        """
        import os, sys, threading
        before = dict(os.environ); threads = threading.active_count()
        import trainkit, trainkit.world, trainkit.dist, trainkit.exit_codes
        assert dict(os.environ) == before, "import changed the environment"
        assert threading.active_count() == threads, "import started a thread"
        assert "torch" not in sys.modules, "import trainkit pulled in torch"
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_init_single_process_is_idempotent_and_shutdown_is_safe() -> None:
    result = run_python(
        """
        import torch, torch.distributed as dist, trainkit
        world = trainkit.init()
        assert trainkit.init() is world
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        t = torch.ones(3); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0, 1.0]
        trainkit.shutdown(); trainkit.shutdown()
        assert not dist.is_initialized()
        print(world.source)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "single"


def test_groups_created_later_get_the_timeout_init_was_given() -> None:
    result = run_python(
        """
        from datetime import timedelta
        import trainkit
        from trainkit.dist import collective_timeout
        assert collective_timeout() is None
        trainkit.init(timeout=timedelta(seconds=7))
        print(collective_timeout().total_seconds())
        trainkit.shutdown()
        assert collective_timeout() is None
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7.0"


def test_init_joins_the_world_it_is_given_not_the_process_environment() -> None:
    # The process has no MASTER_ADDR/MASTER_PORT: env:// would fail; the World names the address.
    result = run_python(
        """
        import os, socket, torch, torch.distributed as dist, trainkit
        from trainkit.world import World
        assert "MASTER_ADDR" not in os.environ
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
        world = World(rank=0, world_size=1, master_port=port, source="env")
        assert trainkit.init(world=world) is world
        t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]
        trainkit.shutdown()
        print("joined")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "joined"


def test_agent_store_comes_from_the_world_and_is_namespaced_by_restart() -> None:
    # The agent's store is a server the worker only connects to; World.use_agent_store says so,
    # with no TORCHELASTIC_USE_AGENT_STORE in the process environment.
    result = run_python(
        """
        import os, socket, torch, torch.distributed as dist, trainkit
        from trainkit.world import World
        assert "TORCHELASTIC_USE_AGENT_STORE" not in os.environ
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
        agent = dist.TCPStore("127.0.0.1", port, world_size=1, is_master=True, wait_for_workers=False)
        world = World(
            rank=0, world_size=1, master_port=port, restart_count=2, run_id="r",
            source="torchrun", use_agent_store=True,
        )
        trainkit.init(world=world)
        t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]
        keys = agent.list_keys()
        trainkit.shutdown()
        assert keys and all(key.startswith("trainkit/attempt-2/") for key in keys), keys
        print("agent store")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "agent store"


def test_fresh_store_each_round_needs_no_restart_prefix() -> None:
    # trainkit-run gives every round a fresh store; a pod that joined later has restart_count 0
    # while the others count 1, so a per-restart prefix would keep them waiting for each other.
    result = run_python(
        """
        import os, socket, torch, torch.distributed as dist, trainkit
        from trainkit.world import World
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
        agent = dist.TCPStore("127.0.0.1", port, world_size=1, is_master=True, wait_for_workers=False)
        world = World(
            rank=0, world_size=1, master_port=port, restart_count=3, run_id="r",
            source="torchrun", use_agent_store=True,
        )
        trainkit.init(world=world)
        keys = agent.list_keys()
        trainkit.shutdown()
        assert keys and all(key.startswith("trainkit/round/") for key in keys), keys
        print("fresh store")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "fresh store"
