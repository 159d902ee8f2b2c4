"""Leaving after an agreed preemption: one ``exit_preempted()`` closes the manager, leaves the
process group and exits 75 with the exit record, and a second SIGTERM meanwhile changes nothing."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

import trainkit
from tests.trainkit.checkpoint.states import make_state
from trainkit.checkpoint import EXIT_PREEMPTED, CheckpointManager, exit_preempted
from trainkit.preemption import EXIT_STATUS_DIR_VARIABLE

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


@pytest.fixture
def sigterm_handler_restored() -> Iterator[None]:
    original = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, original)
        trainkit.shutdown()


@pytest.mark.parametrize("calls", ["one call", "close, shutdown, exit"])
def test_exit_preempted_closes_shuts_down_and_exits_75(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_handler_restored: None, calls: str
) -> None:
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "JOB_COMPLETION_INDEX", "PET_NNODES"):
        monkeypatch.delenv(name, raising=False)
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    monkeypatch.setenv(EXIT_STATUS_DIR_VARIABLE, str(status_dir))
    trainkit.init()
    monkeypatch.setenv("RANK", "0")  # names the exit record, as the launcher's worker env does
    checkpoints = CheckpointManager(tmp_path / "ckpt", async_save=False)
    state = make_state()

    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoints.maybe_save(4, state) and checkpoints.should_stop
    if calls != "one call":
        checkpoints.close()
        trainkit.shutdown()
    with pytest.raises(SystemExit) as exited:
        exit_preempted()
    assert exited.value.code == EXIT_PREEMPTED
    assert not dist.is_initialized()
    record = json.loads((status_dir / "rank-0").read_text())
    assert record == {"code": EXIT_PREEMPTED, "step": 4, "committed": True}
    # Still handled after close: a second SIGTERM during shutdown must not end the process early.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoints.committed_steps() == [4]


def test_manager_exit_preempted_waits_for_its_in_flight_save(
    tmp_path: Path, sigterm_handler_restored: None
) -> None:
    checkpoints = CheckpointManager(tmp_path, signals=None)
    checkpoints.save(2, make_state())  # async: still being written when exit starts
    with pytest.raises(SystemExit) as exited:
        checkpoints.exit_preempted()
    assert exited.value.code == EXIT_PREEMPTED
    assert CheckpointManager(tmp_path, signals=None).committed_steps() == [2]
