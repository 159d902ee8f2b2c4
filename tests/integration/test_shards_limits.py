"""Resource limits in real processes: a loader over hundreds of shards stays within a small
``ulimit -n``, and a failing worker makes the loader raise and the process exit, never hang."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shards import Manifest, write_shards
from tests.shards.synthetic import make_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

READ_EPOCH = textwrap.dedent(
    """
    import resource, sys
    from shards import RankWorld, ShardedDataset, ShardedLoader
    url, limit, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    dataset = ShardedDataset(url, batch_size=16, world=RankWorld(0, 1), max_open_files=8)
    count = sum(len(batch["id"]) for batch in ShardedLoader(dataset, num_workers=workers))
    print("rows", count)
    """
)


def run_script(tmp_path: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "read_epoch.py"
    script.write_text(READ_EPOCH)
    env = {
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TMPDIR": str(tmp_path),  # records of checked row groups stay in the test's directory
        "PATH": os.environ.get("PATH", ""),
    }
    # a hang is the failure this guards against: the hard timeout makes it a test failure
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )


@pytest.fixture
def many_shards(tmp_path) -> str:
    url = str(tmp_path / "many")
    write_shards(
        make_table(12_000),
        url,
        format="arrow",
        row_group_bytes=512,
        bytes_per_shard=1024,
        progress=False,
    )
    return url


def test_hundreds_of_shards_fit_a_small_descriptor_limit(many_shards, tmp_path):
    num_shards = len(Manifest.load(many_shards).shards)
    limit = 128
    assert num_shards > 2 * limit, "more shards than descriptors"
    result = run_script(tmp_path, many_shards, str(limit), "2", timeout_s=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows 12000" in result.stdout


def test_a_failing_worker_makes_the_loader_raise_and_exit(many_shards, tmp_path):
    manifest = Manifest.load(many_shards)
    shard = manifest.shards[len(manifest.shards) // 2]
    group = shard.row_groups[0]
    with open(os.path.join(many_shards, shard.path), "r+b") as handle:
        handle.seek(group.offset + group.length // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = run_script(tmp_path, many_shards, "4096", "3", timeout_s=120)
    assert result.returncode != 0
    assert f"shard {many_shards}/{shard.path}: row group 0" in result.stderr
    assert "checksum mismatch" in result.stderr
