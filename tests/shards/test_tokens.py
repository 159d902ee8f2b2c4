"""TokenWindowDataset on real files: windows are slices of the concatenated stream at any block size,
exactly once per epoch across ranks, workers and a world change, resumable, with clear refusals.

Every token's value is its position in the stream, so a window ``k`` of block ``b`` must read
``arange(k * b, k * b + b + 1)`` whatever rows and row groups it crosses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

from shards import ShardedLoader, ShardsError, TokenWindowDataset, write_shards
from tests.shards.in_process import run_every_rank

NUM_TOKENS = 20_011


@dataclass(frozen=True)
class FakeWorld:
    rank: int
    world_size: int


def documents(num_tokens: int = NUM_TOKENS, seed: int = 0) -> pa.Table:
    """Documents of 1..60 tokens (a list<int32> column) whose values count up across documents."""
    lengths = []
    rng = np.random.default_rng(seed)
    while sum(lengths) < num_tokens:
        lengths.append(int(rng.integers(1, 61)))
    lengths[-1] -= sum(lengths) - num_tokens
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = pa.array(np.arange(num_tokens, dtype=np.int32))
    return pa.table({"doc": pa.ListArray.from_arrays(pa.array(offsets), values)})


@pytest.fixture(scope="module", params=["arrow", "parquet"])
def stream_url(request, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("tokens") / request.param)
    # ~1 KiB row groups of ~250 tokens: windows of 64 cross several row groups
    write_shards(
        documents(),
        url,
        format=request.param,
        row_group_bytes=1024,
        bytes_per_shard=8192,
        progress=False,
    )
    return url


def windows_dataset(url, rank=0, world_size=1, **kwargs):
    kwargs.setdefault("column", "doc")
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("batch_size", 8)
    return TokenWindowDataset(url, world=FakeWorld(rank, world_size), with_index=True, **kwargs)


def check_windows(batch, block_size):
    windows = batch["_index"].numpy()
    expected = windows[:, None] * block_size + np.arange(block_size + 1)
    assert np.array_equal(batch["doc"].numpy(), expected)


@pytest.mark.parametrize("block_size", [5, 16, 300])
def test_windows_of_any_block_size_are_the_stream(stream_url, block_size):
    ds = windows_dataset(stream_url, block_size=block_size, batch_size=4)
    assert ds.num_tokens == NUM_TOKENS and ds.num_windows == (NUM_TOKENS - 1) // block_size
    seen = []
    for batch in ds:
        assert batch["doc"].shape == (4, block_size + 1) and batch["doc"].dtype == torch.int32
        check_windows(batch, block_size)
        seen.append(batch["_index"])
    seen = torch.cat(seen).numpy()
    assert len(np.unique(seen)) == len(seen) == ds.num_windows - ds.num_dropped
    assert not np.array_equal(seen, np.sort(seen)), "shuffled"


def run_world(url, world_size, num_workers=0, stop=None, states=None, **kwargs):
    """Every rank of a world in this process: window numbers per rank, states after ``stop``."""
    return run_every_rank(
        lambda rank: windows_dataset(url, rank, world_size, **kwargs),
        world_size,
        key="_index",
        num_workers=num_workers,
        stop=stop,
        states=states,
        check=lambda ds, batch: check_windows(batch, ds.block_size),
    )


def test_world_change_mid_epoch_covers_every_window_once(stream_url):
    first, states = run_world(stream_url, world_size=2, stop=30)
    assert [len(w) for w in first] == [30 * 8, 30 * 8]
    second, end = run_world(stream_url, world_size=3, states=states)
    assert len({len(w) for w in second}) == 1, "every rank gets as many batches"
    delivered = np.concatenate(first + second)
    assert len(delivered) == len(np.unique(delivered)), "no window twice"
    num_windows = (NUM_TOKENS - 1) // 16
    dropped = num_windows - len(delivered)
    assert 0 <= dropped < 3 * 8, "only the last split's remainder is dropped"
    resumed = windows_dataset(stream_url, 0, 3)
    resumed.load_state_dict(end[0])
    assert resumed.num_dropped == dropped and resumed.consumed_batches == len(resumed)


def test_padding_delivers_every_window_and_flags_repeats(stream_url):
    seen, _ = run_world(stream_url, world_size=5, batch_size=64, drop_last=False)
    assert sorted(np.concatenate(seen).tolist()) == list(range((NUM_TOKENS - 1) // 16))


@pytest.mark.timeout(120)
def test_loader_workers_keep_the_order_and_count_what_the_loop_took(stream_url):
    plain, _ = run_world(stream_url, world_size=2)
    head, states = run_world(stream_url, world_size=2, num_workers=2, stop=11)
    assert [s["consumed"] for s in states] == [11 * 8, 11 * 8]
    tail, _ = run_world(stream_url, world_size=2, num_workers=1, states=states)
    for rank in range(2):
        assert np.array_equal(np.concatenate([head[rank], tail[rank]]), plain[rank])


def test_epochs_reshuffle_and_unshuffled_is_stream_order(stream_url):
    ds = windows_dataset(stream_url, shuffle=False)
    order = torch.cat([b["_index"] for b in ds]).numpy()
    assert np.array_equal(order, np.arange(len(order)))
    ds = windows_dataset(stream_url)
    epoch0 = torch.cat([b["_index"] for b in ds])
    ds.set_epoch(1)
    assert not torch.equal(epoch0, torch.cat([b["_index"] for b in ds]))


def test_fixed_size_and_integer_token_columns(tmp_path):
    tokens = np.arange(4000, dtype=np.int64)
    table = pa.table(
        {
            "row": pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.int32)), 40),
            "flat": pa.array(tokens[:100]),
        }
    )
    write_shards(table, str(tmp_path / "d"), row_group_bytes=2048, progress=False)
    batch = next(iter(windows_dataset(str(tmp_path / "d"), column="row", block_size=50)))
    windows = batch["_index"].numpy()[:, None] * 50 + np.arange(51)
    assert np.array_equal(batch["row"].numpy(), windows)
    flat = windows_dataset(str(tmp_path / "d"), column="flat", block_size=3, batch_size=2)
    assert flat.num_windows == 33 and next(iter(flat))["flat"].dtype == torch.int64


def test_counts_missing_from_an_older_manifest_are_read_once(stream_url, tmp_path, caplog):
    import shutil

    older = tmp_path / "older"
    shutil.copytree(stream_url, older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["metadata"] = {}
    (older / "manifest.json").write_text(json.dumps(manifest))
    ds = windows_dataset(str(older), shuffle=False)
    assert "no token counts" in caplog.text and ds.num_tokens == NUM_TOKENS
    check_windows(next(iter(ds)), 16)


def test_refusals_name_the_problem(stream_url, tmp_path):
    ds = windows_dataset(stream_url)
    loader = ShardedLoader(ds)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ShardsError, match="block_size=16 but this dataset has 32"):
        windows_dataset(stream_url, block_size=32).load_state_dict(state)
    with pytest.raises(ShardsError, match="no column 'text'"):
        windows_dataset(stream_url, column="text")
    with pytest.raises(ShardsError, match="lower batch_size or block_size"):
        windows_dataset(stream_url, block_size=1000, batch_size=64, world_size=4)
    write_shards(pa.table({"f": [0.5, 1.5]}), str(tmp_path / "floats"), progress=False)
    with pytest.raises(ShardsError, match="column 'f' has type double; token windows need"):
        windows_dataset(str(tmp_path / "floats"), column="f", block_size=1, batch_size=1)
