"""Bad input is named, never skipped: flipped bytes, truncated files, schema drift at read, missing
manifest, manifest paths escaping the root; ``verify_dataset`` lists every bad shard."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from shards import (
    ChecksumMismatchError,
    ManifestError,
    SchemaDriftError,
    ShardedDataset,
    ShardsError,
    UnsafePathError,
    verify_dataset,
    write_shards,
)
from shards.manifest import Manifest
from tests.shards.synthetic import make_table


class World:
    rank, world_size = 0, 1


def read_all(url):
    return [b for b in ShardedDataset(url, batch_size=10, world=World())]


def write(tmp_path, fmt):
    url = str(tmp_path / fmt)
    write_shards(
        make_table(600), url, format=fmt, row_group_bytes=2048, bytes_per_shard=8192, progress=False
    )
    return url, Manifest.load(url)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_flipped_byte_is_named(tmp_path, fmt):
    url, manifest = write(tmp_path, fmt)
    shard = manifest.shards[1]
    group = shard.row_groups[1]
    path = os.path.join(url, shard.path)
    with open(path, "r+b") as handle:
        handle.seek(group.offset + group.length // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(
        ChecksumMismatchError, match=rf"shard {url}/{shard.path}: row group 1 .*checksum mismatch"
    ):
        read_all(url)
    problems = verify_dataset(url)
    assert [p.url for p in problems] == [f"{url}/{shard.path}"]


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_truncated_file_is_named(tmp_path, fmt):
    url, manifest = write(tmp_path, fmt)
    shard = manifest.shards[0]
    path = os.path.join(url, shard.path)
    os.truncate(path, shard.bytes - 100)
    with pytest.raises(
        ChecksumMismatchError, match=rf"shard {url}/{shard.path} has {shard.bytes - 100} bytes"
    ):
        read_all(url)
    assert verify_dataset(url)[0].problem.startswith("size")


def test_schema_drift_is_refused_at_read(tmp_path):
    url, manifest = write(tmp_path, "arrow")
    other = make_table(10).set_column(0, "id", pa.array(range(10), pa.int32()))
    shard = manifest.shards[0]
    path = os.path.join(url, shard.path)
    with pa.ipc.new_file(path, other.schema) as writer:
        writer.write_table(other)
    data = json.loads(Path(url, "manifest.json").read_text())
    data["shards"][0]["bytes"] = os.path.getsize(path)  # same size, so only the schema differs
    Path(url, "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        SchemaDriftError,
        match=rf"shard {url}/{shard.path}: schema drift: column 'id' has type int32",
    ):
        read_all(url)


def test_manifest_problems(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest.json: no manifest"):
        read_all(str(tmp_path / "missing"))
    url, _ = write(tmp_path, "parquet")
    data = json.loads(Path(url, "manifest.json").read_text())
    for bad in ("../escape.parquet", "/etc/passwd", "a/../../b.parquet", "s3://other/x.parquet"):
        data["shards"][0]["path"] = bad
        Path(url, "manifest.json").write_text(json.dumps(data))
        with pytest.raises(UnsafePathError, match="escapes the dataset root"):
            read_all(url)
    Path(url, "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_all(url)


def test_missing_shard_is_named(tmp_path):
    url, manifest = write(tmp_path, "parquet")
    os.unlink(os.path.join(url, manifest.shards[-1].path))
    with pytest.raises(Exception, match=rf"shard {url}/{manifest.shards[-1].path} is missing"):
        read_all(url)
    assert verify_dataset(url)[0].problem == "missing"


def test_checks_are_remembered_per_file_version(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    url, manifest = write(tmp_path, "arrow")
    first = ShardedDataset(url, batch_size=10, world=World())
    list(first)
    assert first._process_reader().checks == manifest.num_row_groups
    second = ShardedDataset(url, batch_size=10, world=World())
    list(second)
    assert second._process_reader().checks == 0, "another reader on this node trusts the record"
    shard = manifest.shards[0]
    path = os.path.join(url, shard.path)
    with open(path, "r+b") as handle:  # rewriting the file gives it a new mtime: a new record
        handle.seek(shard.row_groups[0].offset + 50)
        handle.write(b"\xff\xfe")
    with pytest.raises(ChecksumMismatchError, match="row group 0"):
        list(ShardedDataset(url, batch_size=10, world=World(), shuffle=False))


def test_symlinks_out_of_the_root_are_refused(tmp_path):
    url, manifest = write(tmp_path, "arrow")
    shard = manifest.shards[1]
    inside = os.path.join(url, shard.path)
    outside = tmp_path / "elsewhere.arrow"
    os.replace(inside, outside)
    os.symlink(outside, inside)  # the bytes are intact: only where they live is wrong
    with pytest.raises(
        UnsafePathError,
        match=rf"dataset {url}: shard {shard.path} resolves to {outside}, outside the dataset "
        rf"root {os.path.realpath(url)}",
    ):
        read_all(url)
    assert [p.url for p in verify_dataset(url)] == [f"{url}/{shard.path}"]
    os.unlink(inside)
    os.replace(outside, tmp_path / "arrow" / "moved.arrow")
    os.symlink("moved.arrow", inside)  # a symlink that stays inside the root is fine
    linked_root = tmp_path / "linked"
    os.symlink(url, linked_root)  # and so is a dataset root reached through a symlink
    assert len(read_all(url)) == len(read_all(str(linked_root))) == 60


def test_unknown_and_uninstalled_url_schemes_name_the_url_and_the_fix():
    with pytest.raises(
        ShardsError, match=r"dataset nope://bucket/ds: unknown URL scheme 'nope'.*pip install s3fs"
    ):
        read_all("nope://bucket/ds")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(
            ShardsError,
            match=r"dataset gcs://bucket/ds: the gcs:// scheme needs a package .*pip install gcsfs",
        ):
            read_all("gcs://bucket/ds")
