"""Real processes: 2 ranks x 2 DataLoader workers through ``trainkit-run`` read token windows in
lock-step over gloo, stop mid-epoch and save rank 0's state; 3 ranks x 1 worker finish the epoch.
Every window start of the stream is delivered once, each window the stream's tokens."""

from __future__ import annotations

import textwrap

import pytest

from shards import write_shards
from tests.integration.lockstep import resume_on_a_larger_world
from tests.shards.test_tokens import documents

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NUM_TOKENS = 12_007
BLOCK, BATCH = 24, 8

WORKER = (
    textwrap.dedent(
        """
    import torch
    from shards import TokenWindowDataset
    from tests.integration.lockstep import record_in_lock_step

    def make_dataset(url, world):
        return TokenWindowDataset(
            url, column="doc", block_size=__BLOCK__, batch_size=__BATCH__, world=world, seed=5,
            with_index=True,
        )

    def record(batch):
        starts = batch["_index"] * __BLOCK__
        assert torch.equal(batch["doc"][:, 0].long(), starts) and torch.equal(
            batch["doc"][:, -1].long(), starts + __BLOCK__
        ), "a window is the stream's tokens"
        return batch["_index"].tolist()

    record_in_lock_step(make_dataset, record)
    """
    )
    .replace("__BLOCK__", str(BLOCK))
    .replace("__BATCH__", str(BATCH))
)


def test_two_ranks_then_three_cover_every_window_once(tmp_path):
    url = str(tmp_path / "stream")
    write_shards(documents(NUM_TOKENS), url, format="parquet", row_group_bytes=512, progress=False)
    num_windows = (NUM_TOKENS - 1) // BLOCK
    resume_on_a_larger_world(
        tmp_path, WORKER, url, stop=9, batch_size=BATCH, num_samples=num_windows
    )
