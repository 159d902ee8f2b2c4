"""shards on an S3-compatible server on loopback (moto) through s3fs: writing, byte-range reads,
the local cache (hits, eviction within its byte limit), and a remote that changed after writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from shards import (
    ChecksumMismatchError,
    Manifest,
    ShardedDataset,
    ShardedLoader,
    verify_dataset,
    write_shards,
)
from shards.cache import ShardCache
from tests.fixtures.s3 import s3_server
from tests.shards.synthetic import make_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class World:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


@pytest.fixture
def s3_dataset(s3_server, request):
    fmt = getattr(request, "param", "parquet")
    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/datasets/tokens"
    write_shards(
        make_table(4000),
        url,
        format=fmt,
        row_group_bytes=2048,
        bytes_per_shard=16384,
        storage_options=s3_server.storage_options,
        progress=False,
    )
    return url, s3_server.storage_options


def ids_of(dataset, num_workers=0):
    return np.concatenate(
        [b["id"].numpy() for b in ShardedLoader(dataset, num_workers=num_workers)]
    )


@pytest.mark.parametrize("s3_dataset", ["parquet", "arrow"], indirect=True)
def test_byte_range_reads_deliver_each_sample_once(s3_dataset):
    url, options = s3_dataset
    manifest = Manifest.load(url, storage_options=options)
    assert manifest.url == url and manifest.num_rows == 4000
    seen, bytes_read = [], 0
    for rank in range(2):
        ds = ShardedDataset(url, batch_size=25, world=World(rank, 2), storage_options=options)
        seen.append(ids_of(ds, num_workers=2 if rank else 0))
        ds_stats = ShardedDataset(url, batch_size=25, world=World(rank, 2), storage_options=options)
        list(ds_stats)
        bytes_read += ds_stats.reader_stats["bytes_read"]
    assert sorted(np.concatenate(seen).tolist()) == list(range(4000))
    assert bytes_read <= 1.1 * sum(g.length for s in manifest.shards for g in s.row_groups)
    assert verify_dataset(url, storage_options=options) == []


def test_cache_hits_and_evicts_within_its_limit(s3_dataset, tmp_path):
    url, options = s3_dataset
    manifest = Manifest.load(url, storage_options=options)
    largest = max(shard.bytes for shard in manifest.shards)
    limit = 2 * largest + 100  # room for two shards of several
    assert len(manifest.shards) >= 4
    cache_dir = str(tmp_path / "cache")

    def cached_dataset(**extra):
        return ShardedDataset(
            url,
            batch_size=40,
            world=World(0, 1),
            storage_options=options,
            shuffle=False,
            cache_dir=cache_dir,
            cache_bytes=limit,
            **extra,
        )

    def epoch():
        ds = cached_dataset(readahead_threads=1)
        ids = np.concatenate([b["id"].numpy() for b in ds])
        return ids, ds.reader_stats

    ids, stats = epoch()
    assert np.array_equal(ids, np.arange(4000))
    assert stats["cache_misses"] == len(manifest.shards) and stats["cache_hits"] == 0
    cached = [name for name in os.listdir(cache_dir) if not name.startswith(".")]
    assert sum(os.path.getsize(os.path.join(cache_dir, n)) for n in cached) <= limit
    assert len(cached) == 2, "older shards were evicted"
    # a second reader of the last shard hits the cache
    ds = cached_dataset()
    cache = ShardCache(cache_dir, limit)
    shard = manifest.shards[-1]
    path, mapped = cache.open(ds.location.fs, ds.location.path_of(shard.path), shard, url)
    assert cache.hits == 1 and os.path.getsize(path) == mapped.size() == shard.bytes
    with pytest.raises(Exception, match="more than cache_bytes"):
        ShardCache(cache_dir, 10).open(ds.location.fs, ds.location.path_of(shard.path), shard, url)


def test_changed_remote_is_detected(s3_dataset, s3_server, tmp_path):
    url, options = s3_dataset
    manifest = Manifest.load(url, storage_options=options)
    fs = s3_server.filesystem()
    shard = manifest.shards[0]
    key = url.removeprefix("s3://") + "/" + shard.path
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0xFF  # same size, different bytes
    fs.pipe_file(key, bytes(data))
    with pytest.raises(
        ChecksumMismatchError, match=rf"shard {url}/{shard.path}: downloaded .*remote file changed"
    ):
        list(
            ShardedDataset(
                url,
                batch_size=40,
                world=World(0, 1),
                storage_options=options,
                cache_dir=str(tmp_path / "cache"),
            )
        )
    with pytest.raises(
        ChecksumMismatchError, match=rf"shard {url}/{shard.path}: row group \d+ .*checksum mismatch"
    ):
        list(
            ShardedDataset(
                url, batch_size=40, world=World(0, 1), storage_options=options, shuffle=False
            )
        )
    assert [p.url for p in verify_dataset(url, storage_options=options)] == [f"{url}/{shard.path}"]
    cached = os.listdir(tmp_path / "cache")
    assert ShardCache(str(tmp_path / "cache")).key(shard) not in cached, (
        "the changed shard is not cached"
    )
    assert not [name for name in cached if name.startswith(".part-")], "no partial download is left"


READ_THROUGH_CACHE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from shards import RankWorld, ShardedDataset
    url, options, cache_dir, limit, seed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    for epoch in range(2):
        dataset = ShardedDataset(url, batch_size=40, world=RankWorld(0, 1), seed=seed,
                                 storage_options=options, cache_dir=cache_dir, cache_bytes=limit)
        dataset.set_epoch(epoch)
        ids = np.concatenate([batch["id"].numpy() for batch in dataset])
        assert sorted(ids.tolist()) == list(range(4000)), "every sample once"
    """
)


def test_processes_sharing_a_small_cache_survive_evictions_within_the_limit(s3_dataset, tmp_path):
    url, options = s3_dataset
    manifest = Manifest.load(url, storage_options=options)
    limit = 2 * max(shard.bytes for shard in manifest.shards) + 100
    cache_dir = tmp_path / "cache"
    script = tmp_path / "read_through_cache.py"
    script.write_text(READ_THROUGH_CACHE)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    readers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                url,
                json.dumps(options),
                str(cache_dir),
                str(limit),
                str(seed),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in range(4)
    ]
    largest_seen = 0
    deadline = time.monotonic() + 200
    try:
        while any(reader.poll() is None for reader in readers):
            assert time.monotonic() < deadline, "readers did not finish"
            cached = ShardCache(str(cache_dir), limit).total_bytes()
            largest_seen = max(largest_seen, cached)
            time.sleep(0.005)
        failures = [reader.communicate()[1][-2000:] for reader in readers if reader.returncode]
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    assert not failures, failures
    assert 0 < largest_seen <= limit
    assert ShardCache(str(cache_dir), limit).total_bytes() <= limit
