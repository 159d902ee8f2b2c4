"""Hugging Face ``datasets`` as write_shards sources: built locally (no Hub), written through their
Arrow table with their types, uniform token lists made fixed-size, schema metadata (ClassLabel names)
kept; and the ``fixed_lists`` choice on streamed sources."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

datasets = pytest.importorskip("datasets")

from shards import Manifest, ShardedDataset, ShardsError, TokenWindowDataset, write_shards  # noqa: E402

NUM_ROWS = 600


@dataclass(frozen=True)
class FakeWorld:
    rank: int = 0
    world_size: int = 1


def tokenized() -> datasets.Dataset:
    """What a tokenizer with padding makes: a label, fixed-length ids typed as a plain list, a
    declared fixed-length list, and ragged documents."""
    features = datasets.Features(
        {
            "label": datasets.ClassLabel(names=["negative", "positive", "neutral"]),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "pair": datasets.Sequence(datasets.Value("int32"), length=2),
            "doc": datasets.Sequence(datasets.Value("int32")),
        }
    )
    ids = np.arange(NUM_ROWS * 8, dtype=np.int32).reshape(NUM_ROWS, 8)
    return datasets.Dataset.from_dict(
        {
            "label": [i % 3 for i in range(NUM_ROWS)],
            "input_ids": ids.tolist(),
            "pair": [[i, -i] for i in range(NUM_ROWS)],
            "doc": [list(range(i % 5 + 1)) for i in range(NUM_ROWS)],
        },
        features=features,
    )


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_a_datasets_dataset_keeps_its_types_and_classlabel_names(tmp_path, fmt):
    url = str(tmp_path / fmt)
    write_shards(tokenized(), url, format=fmt, row_group_bytes=4096, progress=False)
    manifest = Manifest.load(url)
    schema = manifest.schema
    assert schema.field("label").type == pa.int64()
    assert schema.field("pair").type == pa.list_(pa.int32(), 2), "fixed_size_list<int32> kept"
    assert schema.field("input_ids").type == pa.list_(pa.int32(), 8), "uniform list made fixed"
    assert schema.field("doc").type == pa.list_(pa.int32()), "ragged lists stay lists"
    features = datasets.Features.from_arrow_schema(schema)
    assert features["label"].names == ["negative", "positive", "neutral"]
    shard_schema = (
        pa.ipc.open_file(f"{url}/{manifest.shards[0].path}").schema
        if fmt == "arrow"
        else pa.parquet.read_schema(f"{url}/{manifest.shards[0].path}")
    )
    assert b"huggingface" in shard_schema.metadata, "the shards carry the metadata too"

    ds = ShardedDataset(
        url,
        batch_size=NUM_ROWS,
        columns=["label", "input_ids", "pair"],
        shuffle=False,
        world=FakeWorld(),
    )
    batch = next(iter(ds))
    assert batch["input_ids"].dtype == torch.int32 and batch["input_ids"].shape == (NUM_ROWS, 8)
    assert torch.equal(batch["input_ids"][:, 0], torch.arange(NUM_ROWS, dtype=torch.int32) * 8)
    assert torch.equal(batch["pair"][:, 1], -torch.arange(NUM_ROWS, dtype=torch.int32))
    assert torch.equal(batch["label"], torch.arange(NUM_ROWS) % 3)
    windows = TokenWindowDataset(
        url, column="doc", block_size=4, batch_size=2, shuffle=False, world=FakeWorld()
    )
    assert windows.num_tokens == sum(i % 5 + 1 for i in range(NUM_ROWS))


def test_a_shuffled_dataset_is_written_in_its_own_order(tmp_path):
    shuffled = tokenized().shuffle(seed=3)
    manifest = write_shards(shuffled, str(tmp_path / "d"), format="arrow", progress=False)
    table = pa.ipc.open_file(f"{tmp_path}/d/{manifest.shards[0].path}").read_all()
    assert table.column("pair").to_pylist()[:20] == shuffled["pair"][:20]
    with pytest.raises(
        TypeError, match=r"DatasetDict with splits \['train'\].*dataset_dict\['train'\]"
    ):
        write_shards(datasets.DatasetDict({"train": shuffled}), str(tmp_path / "e"))


def test_fixed_lists_on_request_for_streamed_sources(tmp_path):
    batches = [
        pa.record_batch({"ids": pa.array([[1, 2, 3]] * 50, pa.list_(pa.int32()))}),
        pa.record_batch({"ids": pa.array([[4, 5, 6]] * 50, pa.list_(pa.int32()))}),
    ]
    kept = write_shards(iter(batches), str(tmp_path / "kept"), progress=False)
    assert kept.schema.field("ids").type == pa.list_(pa.int32()), "streams keep lists by default"
    fixed = write_shards(
        iter(batches), str(tmp_path / "fixed"), fixed_lists=["ids"], progress=False
    )
    assert fixed.schema.field("ids").type == pa.list_(pa.int32(), 3)
    ragged = [*batches, pa.record_batch({"ids": pa.array([[1], [2, 3]], pa.list_(pa.int32()))})]
    with pytest.raises(
        ShardsError,
        match=r"item 2: column 'ids' has lists of 1 to 2 values, but fixed_lists asks for one length \(3",
    ):
        write_shards(iter(ragged), str(tmp_path / "ragged"), fixed_lists=True, progress=False)
    table = pa.Table.from_batches(ragged)
    assert write_shards(table, str(tmp_path / "t"), progress=False).schema.field("ids").type == (
        pa.list_(pa.int32())
    ), "a table whose lists differ anywhere keeps them"
    assert write_shards(
        pa.Table.from_batches(batches), str(tmp_path / "off"), fixed_lists=False, progress=False
    ).schema.field("ids").type == pa.list_(pa.int32())


def test_cli_writes_fixed_lists_on_request(tmp_path):
    import pyarrow.parquet as pq

    from shards.cli import main

    table = pa.table({"ids": pa.array([[1, 2, 3]] * 20, pa.list_(pa.int32()))})
    pq.write_table(table, tmp_path / "in.parquet")
    dest = str(tmp_path / "ds")
    assert (
        main(["write", str(tmp_path / "in.parquet"), dest, "--fixed-lists", "ids", "--no-progress"])
        == 0
    )
    assert Manifest.load(dest).schema.field("ids").type == pa.list_(pa.int32(), 3)
