"""A real single-node Ray cluster for trainkit-ray tests: started with ``ray start`` on loopback,
small (2 CPUs, 200 MB object store), usage stats off, stopped with ``ray stop --force``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
NUM_CPUS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    """The environment for Ray processes and launchers: no usage stats, no torchrun leftovers."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_", "RAY_"))
    }
    env.pop("OMP_NUM_THREADS", None)
    # Workers import trainkit and the test scripts from this checkout.
    root = str(Path(__file__).parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """Address of a fresh local Ray head; every Ray process is stopped afterwards."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install trainkit[ray])")
    port = free_port()
    # Ray's socket paths must stay short: a directory directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="tkray-", dir="/tmp")
    command = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={NUM_CPUS}",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    try:
        started = subprocess.run(
            command, capture_output=True, text=True, timeout=240, env=ray_env()
        )
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=ray_env())
        shutil.rmtree(temp_dir, ignore_errors=True)
