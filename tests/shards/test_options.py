"""The configuration values of a dataset: ``RankWorld`` (who reads) and ``ReadOptions`` (how), and
that ``shards`` stands alone: reading a dataset imports nothing from trainkit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from shards import RankWorld, ReadOptions, ShardedDataset, WorldLike
from shards.options import check_world


def test_rank_world_reads_the_environment_once_and_checks_it():
    env = {"RANK": "3", "WORLD_SIZE": "4"}
    world = RankWorld.from_env(env)
    env["RANK"] = "0"
    assert (world.rank, world.world_size) == (3, 4), "a value, not a view of the environment"
    assert RankWorld.from_env({}) == RankWorld(0, 1)
    with pytest.raises(ValueError, match=r"rank 4 is outside the world of 4"):
        RankWorld.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match=r"RANK='x'.*pass world= explicitly"):
        RankWorld.from_env({"RANK": "x"})


def test_trainkit_world_satisfies_the_world_protocol():
    from trainkit import World

    world = World.from_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert isinstance(world, WorldLike) and isinstance(RankWorld(0, 1), WorldLike)
    assert check_world(world) == RankWorld(1, 2)


def test_read_options_validate_and_old_keywords_override(dataset_url):
    with pytest.raises(ValueError, match=r"cache_bytes=100 needs cache_dir"):
        ReadOptions(cache_bytes=100)
    with pytest.raises(ValueError, match=r"max_open_files \(0\) must be positive"):
        ReadOptions(max_open_files=0)
    base = ReadOptions(readahead_bytes=1 << 20, verify=False)
    ds = ShardedDataset(
        dataset_url, batch_size=8, world=RankWorld(0, 1), read_options=base, readahead_threads=2
    )
    assert ds.read_options == ReadOptions(
        readahead_bytes=1 << 20, verify=False, readahead_threads=2
    )
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['cache_size'\]"):
        ShardedDataset(dataset_url, batch_size=8, world=RankWorld(0, 1), cache_size=10)
    with pytest.raises(ValueError, match=r"world=.*has no rank/world_size"):
        ShardedDataset(dataset_url, batch_size=8, world=object())


def test_reading_imports_nothing_from_trainkit(dataset_url, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from shards import RankWorld, ShardedDataset, ShardedLoader
        loader = ShardedLoader(ShardedDataset({dataset_url!r}, batch_size=8, world=RankWorld(0, 1)))
        for _ in loader:
            pass
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("trainkit", "launchers"))
        assert not leaked, leaked
        """
    )
    env = {"TMPDIR": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
