"""Restore with a real process group: a damaged newest step falls back on every rank, in a world of
one after ``trainkit.init()`` and with two ranks (DCP gathers read errors across ranks by pickle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.processes import finish, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
WORKER = Path(__file__).parents[1] / "trainkit" / "checkpoint" / "scripts" / "fallback_worker.py"


def run_workers(nproc: int, root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    command = [*TORCHRUN, "--nproc-per-node", str(nproc), str(WORKER), str(root), str(out)]
    code, output = finish(start(command, env), 240, "the checkpoint workers")
    return subprocess.CompletedProcess(command, code, output)


@pytest.mark.parametrize("nproc", [1, 2])
def test_flipped_byte_in_newest_step_falls_back_with_a_process_group(
    tmp_path: Path, nproc: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_workers(nproc, tmp_path / "ckpt", out)
    assert result.returncode == 0, result.stdout[-4000:]
    for rank in range(nproc):
        assert (out / f"restored-rank{rank}").read_text() == "10 True", rank
