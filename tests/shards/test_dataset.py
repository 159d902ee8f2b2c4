"""ShardedDataset and ShardedLoader on real files: tensors, exactly-once across ranks and workers,
resume at other world sizes, padding, transform, state that torch.load(weights_only=True) accepts."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

from shards import ShardedDataset, ShardedLoader, ShardsError
from tests.shards.in_process import run_every_rank


@dataclass(frozen=True)
class FakeWorld:
    rank: int
    world_size: int


def dataset(url, rank, world_size, **kwargs):
    kwargs.setdefault("batch_size", 16)
    return ShardedDataset(url, world=FakeWorld(rank, world_size), with_index=True, **kwargs)


def test_batches_are_tensors_of_the_right_rows(dataset_url):
    ds = dataset(dataset_url, 0, 1, batch_size=32)
    batch = next(iter(ds))
    assert batch["tokens"].shape == (32, 4) and batch["tokens"].dtype == torch.int32
    assert batch["id"].dtype == torch.int64 and batch["weight"].dtype == torch.float32
    assert torch.equal(batch["id"], batch["_index"])
    assert torch.equal(batch["tokens"][:, 1], (batch["id"] * 4 + 1).int())
    assert torch.equal(batch["weight"], (batch["id"] % 7).float())


def loader_ids(url, world_size, num_workers, stop=None, states=None, **kwargs):
    """Run every rank of a world in this process; returns ids per rank and the states at ``stop``."""
    return run_every_rank(
        lambda rank: dataset(url, rank, world_size, **kwargs),
        world_size,
        key="id",
        num_workers=num_workers,
        stop=stop,
        states=states,
    )


@pytest.mark.timeout(120)
def test_resume_at_another_world_and_worker_count_is_exactly_once(dataset_url):
    first, states = loader_ids(dataset_url, world_size=3, num_workers=2, stop=20)
    assert {len(ids) for ids in first} == {20 * 16}
    second, end_states = loader_ids(dataset_url, world_size=2, num_workers=0, states=states)
    assert len(second[0]) == len(second[1])
    everything = np.concatenate(first + second)
    assert len(everything) == len(np.unique(everything)), "no sample twice"
    dropped = 3000 - len(everything)
    assert 0 <= dropped < 2 * 16, "only the final split's remainder is dropped"
    ds = dataset(dataset_url, 0, 2)
    ds.load_state_dict(end_states[0])
    assert len(ds) == ds.consumed_batches and ds.num_dropped == dropped


def test_order_does_not_depend_on_workers_and_same_world_resume_keeps_it(dataset_url):
    full, _ = loader_ids(dataset_url, world_size=2, num_workers=0)
    with_workers, _ = loader_ids(dataset_url, world_size=2, num_workers=2)
    for a, b in zip(full, with_workers, strict=True):
        assert np.array_equal(a, b)
    head, states = loader_ids(dataset_url, world_size=2, num_workers=2, stop=7)
    tail, _ = loader_ids(dataset_url, world_size=2, num_workers=1, states=states)
    for rank in range(2):
        assert np.array_equal(np.concatenate([head[rank], tail[rank]]), full[rank])


def test_prefetched_batches_are_not_counted(dataset_url):
    ds = dataset(dataset_url, 0, 1)
    loader = ShardedLoader(ds, num_workers=2, prefetch_factor=4)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    assert loader.state_dict()["consumed"] == 3 * 16
    del iterator


def test_padding_flags_repeats_and_delivers_everything(dataset_url):
    ids, _ = loader_ids(dataset_url, world_size=7, num_workers=2, batch_size=64, drop_last=False)
    assert sorted(np.concatenate(ids).tolist()) == list(range(3000))
    ds = dataset(dataset_url, 6, 7, batch_size=64, drop_last=False)
    last = list(ds)[-1]
    assert last["_padding"].any() and last["_padding"].dtype == torch.bool


def test_state_is_plain_data_and_checkpoint_safe(dataset_url):
    ds = dataset(dataset_url, 1, 2)
    loader = ShardedLoader(ds)
    for index, _ in enumerate(loader):
        if index == 4:
            break
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == loader.state_dict() and len(str(state)) < 400
    resumed = dataset(dataset_url, 1, 2)
    resumed.load_state_dict(state)
    assert resumed.consumed_batches == 5


def test_epochs_differ_and_repeat_without_set_epoch(dataset_url):
    ds = dataset(dataset_url, 0, 1, batch_size=20)  # 3000 rows: nothing dropped
    epoch0 = torch.cat([b["id"] for b in ds])
    again = torch.cat([b["id"] for b in ds])
    ds.set_epoch(1)
    epoch1 = torch.cat([b["id"] for b in ds])
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist())


def test_unshuffled_is_file_order(dataset_url):
    ds = dataset(dataset_url, 0, 1, shuffle=False, batch_size=100)
    ids = torch.cat([b["id"] for b in ds])
    assert torch.equal(ids, torch.arange(3000))


def test_wait_observer_sees_every_batch(dataset_url):
    waits = []
    loader = ShardedLoader(dataset(dataset_url, 0, 2), num_workers=1, wait_observer=waits.append)
    count = sum(1 for _ in loader)
    assert len(waits) == count == len(loader) and all(w >= 0 for w in waits)


def test_transform_receives_arrow_batches(tmp_path):
    from shards import write_shards

    table = pa.table({"text": [f"row {i}" for i in range(200)], "id": np.arange(200)})
    write_shards(table, str(tmp_path / "t"), progress=False, row_group_bytes=512)
    with pytest.raises(ShardsError, match=r"'text' has type string.*transform="):
        ShardedDataset(str(tmp_path / "t"), batch_size=10, world=FakeWorld(0, 1))

    def lengths(batch: pa.RecordBatch):
        return {
            "length": torch.tensor([len(s) for s in batch.column("text").to_pylist()]),
            "id": torch.tensor(batch.column("id").to_numpy()),
        }

    ds = ShardedDataset(
        str(tmp_path / "t"), batch_size=10, world=FakeWorld(0, 1), transform=lengths
    )
    batches = list(ds)
    assert len(batches) == 20 and sorted(torch.cat([b["id"] for b in batches]).tolist()) == list(
        range(200)
    )
    only_ids = ShardedDataset(
        str(tmp_path / "t"), batch_size=10, world=FakeWorld(0, 1), columns=["id"]
    )
    assert set(next(iter(only_ids))) == {"id"}


def test_bad_arguments_name_the_problem(dataset_url, tmp_path):
    with pytest.raises(ShardsError, match=r"unknown column\(s\) \['nope'\]"):
        dataset(dataset_url, 0, 1, columns=["id", "nope"])
    with pytest.raises(
        ShardsError, match=r"batch_size 2000 is larger than a rank's share \(3000 rows / 2"
    ):
        dataset(dataset_url, 0, 2, batch_size=2000)
    with pytest.raises(ShardsError, match=r"no manifest"):
        dataset(str(tmp_path / "nothing"), 0, 1)
    other = dataset(dataset_url, 0, 1, seed=5)
    with pytest.raises(ShardsError, match=r"seed=0 but this dataset has 5"):
        other.load_state_dict(dataset(dataset_url, 0, 1).state_dict())


def test_default_world_reads_the_environment(dataset_url, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = ShardedDataset(dataset_url, batch_size=8)
    assert (ds.world.rank, ds.world.world_size) == (2, 3)


def test_an_iteration_counts_what_the_loop_takes_and_refuses_a_moved_cursor(dataset_url):
    ds = dataset(dataset_url, 0, 1)
    iteration = ds.begin_iteration()
    batches = iteration.batches()
    next(batches)
    iteration.advance()
    assert ds.consumed_batches == 1 and ds.cursor is iteration.cursor
    ds.set_epoch(1)
    with pytest.raises(ShardsError, match=r"cursor changed \(set_epoch or load_state_dict\)"):
        iteration.advance()
