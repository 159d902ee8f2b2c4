"""The preemption contract end to end: trainkit-run exits 75 only for an agreed, committed
preemption, and a SIGTERM that no ``maybe_save`` answers still ends the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.processes import finish
from trainkit.preemption import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRAINKIT_RUN = [sys.executable, "-m", "launchers.run", "--standalone", "--nproc-per-node", "2"]
WORKER = Path(__file__).parents[1] / "trainkit" / "checkpoint" / "scripts" / "preemption_worker.py"


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_one_rank_exiting_75_without_an_agreed_save_is_a_failure(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*TRAINKIT_RUN, str(WORKER), "rogue", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        start_new_session=True,
    )
    code, output = finish(process, timeout_s=200)
    assert code == 1, output[-4000:]
    assert code != EXIT_PREEMPTED


def test_sigterm_without_maybe_save_falls_back_to_the_default_action(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(WORKER), "never-saves", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(GRACE_S="1"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert process.poll() is None and time.monotonic() < deadline, "worker did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout_s=90)  # the worker itself sleeps for 120 s
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == -signal.SIGTERM, output[-4000:]
    assert "no CheckpointManager.maybe_save() answered it" in output
