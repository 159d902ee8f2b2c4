"""The README's main job end to end: it trains, and it survives a preemption and resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_minimal.py"


def example_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launchers.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(EXAMPLE),
        "--data",
        str(tmp_path / "data"),
        "--rows",
        "8192",
        *args,
    ]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    return {**env, **extra}


def logged_losses(output: str) -> dict[int, float]:
    return {
        int(step): float(loss)
        for step, loss in re.findall(r"step\s+(\d+)\s+loss ([0-9.]+)", output)
    }


def test_main_job_trains_from_shards(tmp_path: Path) -> None:
    result = subprocess.run(
        example_command(tmp_path, "--steps", "120"),
        capture_output=True,
        text=True,
        timeout=200,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = logged_losses(result.stdout)
    assert losses[1] > 5 * losses[120], losses
    assert (tmp_path / "data" / "manifest.json").exists()


def test_main_job_is_preempted_and_resumes(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(checkpoints), "--save-every", "20", "--log-every", "1000")
    process = subprocess.Popen(
        example_command(tmp_path, "--steps", "100000", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(TRAINKIT_GRACE_PERIOD_S="20"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("step_*/COMMIT.json")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][
                -3000:
            ]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    saved = re.findall(r"preemption save of step (\d+) committed", stderr)
    assert len(saved) == 2 and saved[0] == saved[1], stderr[-3000:]
    step = int(saved[0])
    assert (checkpoints / f"step_{step:010d}" / "COMMIT.json").exists()

    resumed = subprocess.run(
        example_command(tmp_path, "--steps", str(step + 10), *args),
        capture_output=True,
        text=True,
        timeout=200,
        env=clean_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {step + 1}" in resumed.stdout
    assert "done: 10 steps" in resumed.stdout
