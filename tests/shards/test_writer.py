"""write_shards: every kind of source, deterministic output, manifest contents, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards import Manifest, SchemaDriftError, ShardsError, write_shards
from tests.shards.synthetic import make_table


def files_of(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_manifest_describes_the_shards(tmp_path, fmt):
    manifest = write_shards(
        make_table(1000),
        str(tmp_path / "d"),
        format=fmt,
        row_group_bytes=4096,
        bytes_per_shard=20000,
        progress=False,
    )
    loaded = Manifest.load(str(tmp_path / "d"))
    assert loaded.to_json() == manifest.to_json()
    assert loaded.num_rows == 1000 and len(loaded.shards) > 1
    assert all(len(shard.row_groups) > 1 for shard in loaded.shards[:-1])
    data = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["format"] == fmt
    assert [c["name"] for c in data["columns"]] == ["id", "tokens", "weight"]
    for shard in loaded.shards:
        assert os.path.getsize(tmp_path / "d" / shard.path) == shard.bytes
        assert shard.checksum.startswith("crc32:")


def test_output_is_deterministic_whatever_the_source_chunking(tmp_path):
    table = make_table(2000)
    write_shards(table, str(tmp_path / "a"), row_group_bytes=4096, progress=False)
    chunks = [table.slice(i, 333).to_batches()[0] for i in range(0, 2000, 333)]
    write_shards(iter(chunks), str(tmp_path / "b"), row_group_bytes=4096, progress=False)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


def test_every_source_kind(tmp_path):
    table = make_table(500)
    pq.write_table(table.slice(0, 250), tmp_path / "part0.parquet")
    with pa.ipc.new_file(tmp_path / "part1.arrow", table.schema) as writer:
        writer.write_table(table.slice(250, 150))
    with pa.ipc.new_stream(
        tmp_path / "part2.arrow", table.schema
    ) as writer:  # Hugging Face cache layout
        writer.write_table(table.slice(400))
    sources = {
        "files": [
            str(tmp_path / "part0.parquet"),
            str(tmp_path / "part1.arrow"),
            str(tmp_path / "part2.arrow"),
        ],
        "reader": pa.RecordBatchReader.from_batches(
            table.schema, table.to_batches(max_chunksize=100)
        ),
        "batches": table.to_batches(max_chunksize=70),
        "rows": table.to_pylist(),
    }
    for name, source in sources.items():
        manifest = write_shards(source, str(tmp_path / name), format="arrow", progress=False)
        ids = pa.concat_tables(
            pa.ipc.open_file(tmp_path / name / shard.path).read_all() for shard in manifest.shards
        ).column("id")
        assert ids.to_pylist() == list(range(500)), name
    directory = tmp_path / "dir"
    directory.mkdir()
    pq.write_table(table, directory / "all.parquet")
    assert write_shards(str(directory), str(tmp_path / "fromdir"), progress=False).num_rows == 500


def test_schema_drift_is_refused_at_write(tmp_path):
    good = make_table(10)
    bad = good.set_column(2, "weight", pa.array(np.zeros(10), pa.float64()))
    with pytest.raises(
        SchemaDriftError, match=r"item 1 batch 0: schema drift: column 'weight' has type double"
    ):
        write_shards([good, bad], str(tmp_path / "d"), progress=False)
    with pytest.raises(SchemaDriftError, match="unexpected column"):
        write_shards(
            [good, good.append_column("extra", pa.array(range(10)))],
            str(tmp_path / "e"),
            progress=False,
        )
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_refusals(tmp_path):
    with pytest.raises(ShardsError, match="no rows"):
        write_shards(make_table(0), str(tmp_path / "empty"), progress=False)
    write_shards(make_table(10), str(tmp_path / "d"), progress=False)
    with pytest.raises(ShardsError, match="already exists; pass overwrite=True"):
        write_shards(make_table(10), str(tmp_path / "d"), progress=False)
    assert (
        write_shards(make_table(20), str(tmp_path / "d"), progress=False, overwrite=True).num_rows
        == 20
    )
    with pytest.raises(ValueError, match="format 'csv'"):
        write_shards(make_table(10), str(tmp_path / "x"), format="csv")
    with pytest.raises(TypeError, match="cannot read a source of type int"):
        write_shards(3, str(tmp_path / "y"))


def test_progress_without_tqdm_prints_plain_lines(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    write_shards(make_table(100), str(tmp_path / "d"), progress=True)
    assert "shards write: 100 rows" in capsys.readouterr().err
