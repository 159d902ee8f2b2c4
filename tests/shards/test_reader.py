"""ShardReader on real files: open shards are bounded (least recently used closed first) and hold
no file descriptor, and closed shards reopen transparently."""

from __future__ import annotations

import os

from shards.manifest import Manifest
from shards.reader import ShardReader
from shards.storage import resolve_location


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_shards_are_bounded_and_hold_no_descriptor(dataset_url, tmp_path):
    location = resolve_location(dataset_url)
    manifest = Manifest.load_from(location)
    assert len(manifest.shards) > 3
    reader = ShardReader(
        manifest, location, ["id"], marks_dir=str(tmp_path / "marks"), max_open_files=2
    )
    before = open_descriptors()
    first_pass = [reader.load(g)["id"].to_pylist() for g in range(manifest.num_row_groups)]
    assert reader.num_open == 2
    assert open_descriptors() == before, "memory maps outlive their descriptors"
    again = [reader.load(g)["id"].to_pylist() for g in range(manifest.num_row_groups)]
    assert again == first_pass
    assert [i for ids in first_pass for i in ids] == list(range(manifest.num_rows))
