"""Real processes: 2 ranks x 2 DataLoader workers through ``trainkit-run`` record the ids they see;
the run stops mid-epoch, saves rank 0's loader state, and 3 ranks x 1 worker finish the epoch."""

from __future__ import annotations

import textwrap

import pytest

from tests.integration.lockstep import resume_on_a_larger_world
from tests.shards.synthetic import write_table_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NUM_ROWS = 3000
BATCH = 16

WORKER = textwrap.dedent(
    """
    import torch
    from shards import ShardedDataset
    from tests.integration.lockstep import record_in_lock_step

    def make_dataset(url, world):
        return ShardedDataset(url, batch_size=__BATCH__, world=world, seed=11)

    def record(batch):
        assert torch.equal(batch["tokens"][:, 0], (batch["id"] * 4).int())
        return batch["id"].tolist()

    record_in_lock_step(make_dataset, record)
    """
).replace("__BATCH__", str(BATCH))


def test_two_ranks_two_workers_then_three_ranks_deliver_each_sample_once(tmp_path):
    url = str(tmp_path / "data")
    write_table_dataset(url, NUM_ROWS)
    resume_on_a_larger_world(tmp_path, WORKER, url, stop=30, batch_size=BATCH, num_samples=NUM_ROWS)
