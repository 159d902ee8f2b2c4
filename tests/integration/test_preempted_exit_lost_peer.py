"""A peer that stops answering after the agreed preemption save (its pod cut off or frozen) must
not keep the others from exiting 75: leaving the process group is bounded by half the grace
period, and the exit record still names the committed step."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.processes import clean_env
from trainkit.preemption import EXIT_PREEMPTED, EXIT_STATUS_DIR_VARIABLE, GRACE_PERIOD_VARIABLE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GRACE_S = 6

RANK = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    import trainkit
    from trainkit.checkpoint import CheckpointManager, exit_preempted

    trainkit.init(backend="gloo")
    rank = int(os.environ["RANK"])
    checkpoints = CheckpointManager(sys.argv[1], async_save=False)
    state = {"weights": torch.arange(4.0)}
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoints.maybe_save(3, state) and checkpoints.should_stop
    print("saved", flush=True)
    if rank == 1:
        time.sleep(300)  # alive, sockets open, never at the barrier: a frozen or cut-off peer
    exit_preempted()
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_exit_preempted_leaves_within_the_grace_period_when_a_peer_stops_answering(
    tmp_path: Path,
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    status = tmp_path / "status"
    status.mkdir()
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = clean_env(
            tmp_path,
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **{EXIT_STATUS_DIR_VARIABLE: str(status), GRACE_PERIOD_VARIABLE: str(GRACE_S)},
        )
        command = [sys.executable, str(script), str(tmp_path / "ckpt")]
        ranks.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    try:
        while b"saved" not in (ranks[0].stdout.readline() or b"saved"):
            pass
        saved_at = time.monotonic()
        output, _ = ranks[0].communicate(timeout=60)
        took_s = time.monotonic() - saved_at
    finally:
        for process in ranks:
            process.kill()
            process.wait(timeout=10)
    assert ranks[0].returncode == EXIT_PREEMPTED, output.decode()[-3000:]
    assert took_s < GRACE_S, f"rank 0 took {took_s:.1f} s to leave (grace period {GRACE_S} s)"
    assert b"exiting without it" in output
    record = json.loads((status / "rank-0").read_text())
    assert record == {"code": EXIT_PREEMPTED, "step": 3, "committed": True}
