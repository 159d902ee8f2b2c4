"""Restoring per-rank state into another world size: state that was the same on every saved rank is
restored without a word; only state that differed between ranks is warned about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.trainkit.checkpoint.states import Counter, make_state, rewrite_commit
from trainkit.checkpoint import CheckpointManager
from trainkit.checkpoint.blocks import CHECKSUMS, FileInfo, default_checksum
from trainkit.checkpoint.commit import step_dir_name
from trainkit.world import World

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def state_of_rank(rank: int) -> dict[str, object]:
    state = make_state()  # same model, loader position, generator seed and extras on every rank
    cursor = Counter()
    cursor.position = 100 + rank  # per-rank data cursor: differs
    state["cursor"] = cursor
    return state


def save_two_rank_checkpoint(tmp_path: Path) -> Path:
    """Step 1 as two ranks would write it, saved one rank at a time (no process group needed)."""
    roots = [tmp_path / f"rank{rank}" for rank in (0, 1)]
    for rank, root in enumerate(roots):
        world = World(rank=rank, world_size=2)
        with CheckpointManager(root, signals=None, async_save=False, world=world) as ckpt:
            ckpt.save(1, state_of_rank(rank))
    step_dir = roots[0] / step_dir_name(1)
    data = (roots[1] / step_dir_name(1) / "rank_00001.pt").read_bytes()
    (step_dir / "rank_00001.pt").write_bytes(data)
    info = FileInfo(len(data), [CHECKSUMS[default_checksum()](data)])
    rewrite_commit(
        step_dir, lambda record: record["files"].update({"rank_00001.pt": info.as_dict()})
    )
    return roots[0]


def test_world_change_warns_only_about_state_that_differed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = save_two_rank_checkpoint(tmp_path)
    restored = state_of_rank(0)
    restored["loader"].position = -1
    restored["data_rng"].manual_seed(12345)
    expected_draw = torch.rand(3, generator=make_state()["data_rng"])
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        assert CheckpointManager(root, signals=None).restore(restored) == 1
    warned = "\n".join(record.getMessage() for record in caplog.records)
    assert "'cursor' differed between saved ranks" in warned
    assert "'loader'" not in warned and "'data_rng'" not in warned
    assert restored["loader"].position == 0
    assert restored["cursor"].position == 100
    assert torch.equal(torch.rand(3, generator=restored["data_rng"]), expected_draw)
