"""The loops real training scripts write, on real files: ``batches()`` across epoch boundaries and
resumes, nanoGPT's fetch-ahead loop with ``prefetch_ahead=True``, and transforms that return
something other than a dict."""

from __future__ import annotations

from collections import UserDict
from dataclasses import dataclass

import pyarrow as pa
import pytest
import torch

from shards import ShardedDataset, ShardedLoader, ShardsError, write_shards
from tests.shards.synthetic import make_table, write_table_dataset

BATCH = 64  # 3000 rows / (2 ranks x 64) = 23 batches per rank and epoch
PER_EPOCH = 23


@dataclass(frozen=True)
class FakeWorld:
    rank: int
    world_size: int


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    return write_table_dataset(str(tmp_path_factory.mktemp("loops") / "data"))


def make_loader(url: str, **kwargs) -> ShardedLoader:
    dataset = ShardedDataset(url, batch_size=BATCH, world=FakeWorld(1, 2), seed=7)
    return ShardedLoader(dataset, **kwargs)


def reference(url: str, num_batches: int) -> list[list[int]]:
    """Ids of the first ``num_batches`` batches, epoch after epoch, by plain per-epoch iteration."""
    dataset = ShardedDataset(url, batch_size=BATCH, world=FakeWorld(1, 2), seed=7)
    ids: list[list[int]] = []
    epoch = 0
    while len(ids) < num_batches:
        dataset.set_epoch(epoch)
        ids.extend(batch["id"].tolist() for batch in dataset)
        epoch += 1
    return ids[:num_batches]


def plain_loop(loader: ShardedLoader, steps: int) -> list[list[int]]:
    batches = loader.batches()
    return [next(batches)["id"].tolist() for _ in range(steps)]


@pytest.mark.parametrize("stop", [PER_EPOCH - 1, PER_EPOCH, PER_EPOCH + 1])
def test_batches_span_epochs_and_resume_exactly_across_the_boundary(url, stop):
    total = 2 * PER_EPOCH + 5
    expected = reference(url, total)
    first = make_loader(url)
    head = plain_loop(first, stop)
    assert first.state_dict()["epoch"] == (stop - 1) // PER_EPOCH
    resumed = make_loader(url, num_workers=1 if stop == PER_EPOCH else 0)
    resumed.load_state_dict(first.state_dict())
    assert head + plain_loop(resumed, total - stop) == expected
    assert resumed.state_dict()["epoch"] == 2


def test_batches_after_a_finished_epoch_moves_on(url):
    loader = make_loader(url)
    epoch0 = [batch["id"].tolist() for batch in loader]
    assert len(epoch0) == PER_EPOCH
    assert plain_loop(loader, 1) == reference(url, PER_EPOCH + 1)[PER_EPOCH:]


def nanogpt_loop(loader: ShardedLoader, steps: range, save_at: int | None = None):
    """nanoGPT's shape: the first batch is fetched before the loop, each next one during the
    forward pass, and the checkpoint is taken at the top of an iteration."""
    batches = loader.batches()
    batch = next(batches)
    trained, saved = [], None
    for step in steps:
        if step == save_at:
            saved = loader.state_dict()
        trained.append(batch["id"].tolist())  # forward
        batch = next(batches)  # fetch ahead, before backward
    return trained, saved


@pytest.mark.parametrize("save_at", [0, 5, PER_EPOCH - 1, PER_EPOCH, PER_EPOCH + 1])
def test_a_fetch_ahead_loop_resumes_at_the_batch_it_had_not_trained_on(url, save_at):
    total = PER_EPOCH + 8
    expected = reference(url, total)
    workers = 1 if save_at == PER_EPOCH else 0
    loader = make_loader(url, prefetch_ahead=True, num_workers=workers)
    trained, saved = nanogpt_loop(loader, range(total), save_at=save_at)
    assert trained == expected
    resumed = make_loader(url, prefetch_ahead=True)
    resumed.load_state_dict(saved)
    tail, _ = nanogpt_loop(resumed, range(save_at, total))
    assert trained[:save_at] + tail == expected


def test_prefetch_ahead_counts_a_batch_when_the_next_is_asked_for(url):
    loader = make_loader(url, prefetch_ahead=True)
    batches = iter(loader)
    next(batches)
    assert loader.state_dict()["consumed"] == 0
    next(batches)
    assert loader.state_dict()["consumed"] == BATCH
    assert sum(1 for _ in batches) == PER_EPOCH - 2
    assert loader.state_dict()["consumed"] == PER_EPOCH * BATCH


def test_a_non_dict_transform_is_refused_when_padding_or_index_must_be_added(tmp_path):
    write_shards(make_table(200), str(tmp_path / "t"), progress=False, row_group_bytes=512)

    def as_tuple(batch: pa.RecordBatch):
        return torch.tensor(batch.column("id").to_numpy()), torch.zeros(batch.num_rows)

    def dataset(transform, rank=2, **kwargs) -> ShardedDataset:
        world = FakeWorld(rank, 3)  # 200 rows over 3 ranks in batches of 16: some rows padded
        return ShardedDataset(
            str(tmp_path / "t"), batch_size=16, world=world, transform=transform, **kwargs
        )

    with pytest.raises(ShardsError, match=r"transform returned a tuple.*'_padding' \(drop_last"):
        list(dataset(as_tuple, drop_last=False))
    with pytest.raises(ShardsError, match=r"'_index' \(with_index=True\)"):
        list(ShardedLoader(dataset(as_tuple, with_index=True), num_workers=1))
    assert len(list(dataset(as_tuple))) == 66 // 16  # nothing to add: any result is fine

    def as_user_dict(batch: pa.RecordBatch):
        return UserDict(id=torch.tensor(batch.column("id").to_numpy()))

    real, repeated = [], 0
    for rank in range(3):
        for batch in dataset(as_user_dict, rank, drop_last=False, with_index=True):
            assert torch.equal(batch["id"], batch["_index"])
            real.extend(batch["id"][~batch["_padding"]].tolist())
            repeated += int(batch["_padding"].sum())
    assert sorted(real) == list(range(200)) and repeated == 3 * 5 * 16 - 200
