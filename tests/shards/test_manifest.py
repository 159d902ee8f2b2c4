"""The manifest in memory and on load: columnar (``ShardTable``), identical after a JSON round trip,
and every impossible value refused on load with the shard, the field and the value."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from shards import ManifestError, write_shards
from shards.manifest import Manifest, ShardTable
from tests.shards.synthetic import make_table


@pytest.fixture
def url(tmp_path) -> str:
    url = str(tmp_path / "ds")
    write_shards(make_table(600), url, row_group_bytes=2048, bytes_per_shard=8192, progress=False)
    return url


def edit_manifest(url: str, edit) -> None:
    path = Path(url, "manifest.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_the_manifest_is_columnar_and_round_trips(url):
    manifest = Manifest.load(url)
    table = manifest.shards
    assert isinstance(table, ShardTable) and len(table) > 2
    assert table.rg_offsets.dtype == np.int64 and len(table.rg_rows) == manifest.num_row_groups
    assert table[-1] == table[len(table) - 1] and table[1:3] == [table[1], table[2]]
    assert [s.rows for s in table] == table.rows.tolist() and sum(table.rows) == 600
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())), url=url)
    assert again == manifest
    assert pickle.loads(pickle.dumps(manifest)) == manifest
    rows, shard_ids, local_ids = manifest.row_group_table()
    first = table[int(shard_ids[-1])].row_groups[int(local_ids[-1])]
    assert rows[-1] == first.rows
    with pytest.raises(IndexError):
        table[len(table)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("offset", -5, r"shard shard-00000\.parquet row group 1 has offset -5"),
        ("length", 0, r"shard shard-00000\.parquet row group 1 has length 0"),
        ("rows", -1, r"shard shard-00000\.parquet row group 1 has rows -1"),
        ("checksum", "md5:zz", r"checksum 'md5:zz' is not crc32"),
        ("offset", 1.5, r"expected integers"),
    ],
)
def test_impossible_row_group_values_name_shard_field_and_value(url, field, value, message):
    position = ["rows", "offset", "length", "checksum"].index(field)

    def corrupt(data):
        data["shards"][0]["row_groups"][1][position] = value

    edit_manifest(url, corrupt)
    with pytest.raises(ManifestError, match=rf"{url}: .*{message}"):
        Manifest.load(url)


def test_impossible_shard_values_are_named(url):
    edit_manifest(url, lambda data: data["shards"][1].update(bytes=-3))
    with pytest.raises(ManifestError, match=r"shard shard-00001\.parquet has bytes -3"):
        Manifest.load(url)


def test_a_row_group_past_the_end_of_its_file_is_named_at_read(url):
    from shards import RankWorld, ShardedDataset

    manifest = Manifest.load(url)
    length = manifest.shards[0].row_groups[-1].length

    def corrupt(data):
        data["shards"][0]["row_groups"][-1][2] = length + 10_000

    edit_manifest(url, corrupt)
    dataset = ShardedDataset(url, batch_size=10, world=RankWorld(0, 1), shuffle=False)
    with pytest.raises(ManifestError, match=r"shard-00000\.parquet: row group \d+ spans bytes"):
        list(dataset)
