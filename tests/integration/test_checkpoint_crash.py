"""Crash consistency: a writer saving large states is SIGKILLed at random moments; restore never
returns a partial step, and the step it returns holds exactly what was saved at that step.

Trials: $TRAINKIT_CRASH_TRIALS (default 5 in CI; run with 20 or more locally); state size:
$TRAINKIT_CRASH_MB (default 200).
"""

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
from torch import nn

from trainkit.checkpoint import CheckpointManager

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

WRITER = Path(__file__).parents[1] / "trainkit" / "checkpoint" / "scripts" / "crash_writer.py"
NUM_TENSORS = 8


def test_sigkill_at_random_moments_never_exposes_a_partial_step(tmp_path: Path) -> None:
    trials = int(os.environ.get("TRAINKIT_CRASH_TRIALS", "5"))
    megabytes = float(os.environ.get("TRAINKIT_CRASH_MB", "200"))
    rng = random.Random(os.environ.get("TRAINKIT_CRASH_SEED", "1"))
    root = tmp_path / "ckpt"
    numel = int(megabytes * 2**20 / 4 / NUM_TENSORS)
    outcomes = []
    for trial in range(trials):
        process = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), str(megabytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            ready = process.stdout.readline()
            assert ready.startswith("ready"), f"writer did not start: {ready!r}"
            lines = []
            if trial % 5:
                # Most kills land while later steps are being written over committed ones.
                lines.append(process.stdout.readline())
                assert lines[0].startswith("committed"), (
                    f"writer failed before its first commit: {lines}"
                )
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                time.sleep(rng.uniform(0.0, 1.5))  # possibly before anything is committed
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            lines += process.stdout.read().splitlines()
            committed = [int(line.split()[1]) for line in lines if line.startswith("committed")]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()
        model = nn.ParameterList(
            [
                nn.Parameter(torch.full((numel,), -1.0), requires_grad=False)
                for _ in range(NUM_TENSORS)
            ]
        )
        state = {"model": model, "extras": {}}
        restored = CheckpointManager(root, signals=None).restore(state)
        lower_bound = max(committed, default=0)
        outcomes.append((trial, lower_bound, restored))
        if lower_bound:
            assert restored is not None and restored >= lower_bound, outcomes
        if restored is not None:
            assert state["extras"] == {"step": restored}
            for index, parameter in enumerate(model):
                expected = float(restored * 1000 + index)
                assert bool((parameter == expected).all()), (
                    f"trial {trial}: step {restored} tensor {index} differs"
                )
    print("trial, last printed committed step, restored step:", outcomes)
    assert any(restored for _, _, restored in outcomes), (
        f"no trial ever committed a step: {outcomes}"
    )
