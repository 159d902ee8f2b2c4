"""ShardCache on a local directory with another local directory as the "remote": readers racing
evictions always get their bytes, and the byte limit holds for complete files whatever the
interleaving.

The remote is a plain directory, not fsspec's memory filesystem: that one hands every opener the same
file object, so two threads reading one shard move each other's position (a fixture race that no
real store has)."""

from __future__ import annotations

import sys
import threading

import fsspec
import pytest

from shards.cache import ShardCache
from shards.manifest import ShardInfo
from shards.storage import checksum_of


@pytest.fixture
def remote(tmp_path_factory):
    fs = fsspec.filesystem("file")
    root = tmp_path_factory.mktemp("remote")
    shards = []
    for index in range(3):
        data = bytes([index]) * 4096
        path = str(root / f"shard-{index}.arrow")
        fs.pipe_file(path, data)
        shards.append((path, ShardInfo(path, 1, len(data), checksum_of(data), ())))
    return fs, shards


@pytest.fixture
def fine_thread_switching():
    """Threads interleave between almost any two steps, as processes on a node do."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_readers_racing_evictions_get_their_bytes_within_the_limit(
    remote, tmp_path, fine_thread_switching
):
    fs, shards = remote
    limit = 2 * 4096  # two of the three shards fit: every miss evicts
    errors: list[BaseException] = []
    largest = [0]
    stop = threading.Event()

    def read(shard_ids: list[int]) -> None:
        cache = ShardCache(str(tmp_path), limit)  # one per "process": only the disk is shared
        try:
            for _ in range(200):
                for shard_id in shard_ids:
                    path, shard = shards[shard_id]
                    _, mapped = cache.open(fs, path, shard, f"file://{path}")
                    assert mapped.read_buffer().to_pybytes() == bytes([shard_id]) * 4096
                    mapped.close()
        except BaseException as exc:  # reported below, with the thread's own assertion
            errors.append(exc)

    def watch() -> None:
        cache = ShardCache(str(tmp_path), limit)
        while not stop.is_set():
            largest[0] = max(largest[0], cache.total_bytes())

    watcher = threading.Thread(target=watch)
    readers = [threading.Thread(target=read, args=(ids,)) for ids in ([0], [1, 2], [2, 0])]
    watcher.start()
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(timeout=120)
    stop.set()
    watcher.join(timeout=10)
    assert not errors, errors[0]
    assert 0 < largest[0] <= limit
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".part-")]
