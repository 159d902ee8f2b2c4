"""Backend choice and the process-group life cycle of trainkit.init() in one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from trainkit.dist import resolve_backend


def test_auto_backend_is_gloo_on_cpu_and_a_device_map_with_cuda() -> None:
    assert resolve_backend("auto", cuda_available=False) == "gloo"
    assert resolve_backend("auto", cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert resolve_backend("gloo", cuda_available=True) == "gloo"


def test_nccl_without_cuda_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"needs CUDA.*backend='auto' or 'gloo'"):
        resolve_backend("nccl", cuda_available=False)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
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
