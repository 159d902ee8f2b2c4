"""Exact resume through trainkit-run (SIGTERM at a random step, agreed save, exit 75, restart) and
resharding (save with 4 ranks, restore with 2), with real processes and gloo."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.processes import finish
from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKER = Path(__file__).parents[1] / "trainkit" / "checkpoint" / "scripts" / "ckpt_train.py"
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env.pop("OMP_NUM_THREADS", None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start(launcher: list[str], nproc: int, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*launcher, "--standalone", "--nproc-per-node", str(nproc), str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(**env),
        start_new_session=True,
    )


def read_samples(out: Path, rank: int) -> list[str]:
    return (out / f"samples-rank{rank}.txt").read_text().splitlines()


def test_sigterm_at_a_random_step_then_restart_is_bit_exact(tmp_path: Path) -> None:
    steps = 30
    code, output = finish(
        start(
            TRAINKIT_RUN,
            2,
            "--root",
            str(tmp_path / "ref-ckpt"),
            "--out",
            str(tmp_path / "ref"),
            "--steps",
            str(steps),
        )
    )
    assert code == 0, output[-4000:]

    out, root = tmp_path / "run", tmp_path / "run-ckpt"
    common = ["--root", str(root), "--out", str(out), "--steps", str(steps)]
    target = random.Random(os.environ.get("TRAINKIT_RESUME_SEED")).randint(3, steps - 8)
    process = start(TRAINKIT_RUN, 2, *common, "--step-sleep-s", "0.1", TRAINKIT_GRACE_PERIOD_S="30")
    try:
        progress = out / "progress-rank0"
        deadline = time.monotonic() + 120
        while not (
            progress.exists() and progress.read_text() and int(progress.read_text()) >= target
        ):
            assert process.poll() is None and time.monotonic() < deadline, (
                "workers never reached the target step"
            )
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)  # to trainkit-run only, as the kubelet does
        code, output = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == EXIT_PREEMPTED, output[-4000:]
    preempted_at = len(read_samples(out, 0))
    assert target <= preempted_at < steps, (target, preempted_at)

    code, output = finish(start(TRAINKIT_RUN, 2, *common))
    assert code == 0, output[-4000:]

    reference = torch.load(tmp_path / "ref" / "final.pt", weights_only=True)
    resumed = torch.load(out / "final.pt", weights_only=True)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), (
            f"{key} differs after resume (SIGTERM at step {target})"
        )
    for rank in (0, 1):
        assert read_samples(out, rank) == read_samples(tmp_path / "ref", rank), (
            f"rank {rank} saw other samples"
        )


def test_save_with_4_ranks_restore_with_2(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    common = ["--root", str(root), "--out", str(out), "--steps", "6", "--interval", "100"]
    code, output = finish(start(TORCHRUN, 4, *common, "--mode", "reshard-save"))
    assert code == 0, output[-4000:]
    code, output = finish(start(TORCHRUN, 2, *common, "--mode", "reshard-load"))
    assert code == 0, output[-4000:]
    expected = torch.load(out / "reshard-expected.pt", weights_only=True)
    for rank in (0, 1):
        loaded = torch.load(out / f"reshard-load-rank{rank}.pt", weights_only=True)
        assert loaded["restored"] == 6
        for key, value in expected["params"].items():
            assert torch.equal(loaded["params"][key], value), (rank, key)
        for saved, got in zip(expected["momentum"], loaded["momentum"], strict=True):
            assert torch.equal(saved, got), rank
        # The loader's reshard hook gets every saved rank's position, in rank order.
        assert [s["position"] for s in loaded["merged"]] == [24, 24, 24, 24]
