"""A full volume (a small tmpfs mounted for the test): the failed save names the file and the free
space once, leaves no partial step behind, and a restarted manager still restores from the full
volume. Needs root (mount); skipped otherwise."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.trainkit.checkpoint.states import assert_same_params, params
from trainkit.checkpoint import CheckpointManager, CheckpointSaveError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def fill(volume: Path) -> None:
    """Write until the volume has no space left."""
    with open(volume / "filler", "wb") as handle:
        chunk = bytes(1 << 16)
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_full_volume_names_the_file_cleans_up_and_still_restores(small_volume: Path) -> None:
    root = small_volume / "ckpt"
    torch.manual_seed(0)
    small = {"model": nn.Linear(32, 32)}
    big = {"model": nn.Linear(2048, 1024)}  # 8 MiB of weights: more than the volume holds
    ckpt = CheckpointManager(root, signals=None, async_save=False)
    ckpt.save(1, small)
    with pytest.raises(CheckpointSaveError) as raised:
        ckpt.save(2, big)
    message = str(raised.value)
    assert "step 2" in message
    assert "No space left on device" in message
    assert f"{root}/step_0000000002/" in message  # the file being written
    assert "free on that volume" in message
    assert "rank 0: rank 0" not in message
    assert message.count("No space left on device") == 1
    # The partial step is gone at once, not at the next successful commit.
    assert sorted(os.listdir(root)) == ["step_0000000001"]
    ckpt.close()

    fill(small_volume)
    fresh = {"model": nn.Linear(32, 32)}
    restarted = CheckpointManager(root, signals=None)  # no write probe at construction
    assert restarted.restore(fresh) == 1
    assert_same_params(params(fresh), params(small))
