"""write_shards streams input files: a Parquet file is decoded a few pages at a time (even when it is one
row group) and an Arrow IPC stream (the Hugging Face cache layout) a record batch at a time, so what the writer holds
stays far below the file's size. Measured with Arrow's allocation statistics and tracemalloc (bytes
Python holds), not timings; peak RSS of a large file is in benchmarks/tokens_throughput.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards import Manifest, write_shards

ROWS, WIDTH = 12_000, 512  # 24 MB of int32 tokens
ROWS_PER_INPUT_GROUP = 300  # 40 row groups / record batches in the input file


def token_table() -> pa.Table:
    tokens = np.arange(ROWS * WIDTH, dtype=np.int32)
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), WIDTH)})


MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
from shards import write_shards

def write(source, dest):
    write_shards(source, dest, format="arrow", row_group_bytes=256 << 10,
                 bytes_per_shard=1 << 20, progress=False, overwrite=True)

write(sys.argv[3], sys.argv[2])  # a tiny file first: lazy imports are not the data's bytes
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
write(sys.argv[1], sys.argv[2])
print(json.dumps([pa.default_memory_pool().max_memory(), tracemalloc.get_traced_memory()[1] - before]))
"""


def peak_bytes_while_writing(source: str, dest: str, tiny: str) -> tuple[int, int]:
    """Peak bytes Arrow allocated and peak bytes Python allocated writing ``source``, measured in a
    fresh process (Arrow's peak counts from the process start)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, source, dest, tiny],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    arrow_peak, python_peak = json.loads(done.stdout.splitlines()[-1])
    return arrow_peak, python_peak


@pytest.mark.parametrize("kind", ["parquet", "parquet-one-row-group", "arrow-stream"])
def test_input_files_are_read_a_bounded_piece_at_a_time(tmp_path, kind):
    table = token_table()
    suffix = "arrow" if kind == "arrow-stream" else "parquet"
    group_rows = ROWS if kind == "parquet-one-row-group" else ROWS_PER_INPUT_GROUP
    path, tiny = tmp_path / f"input.{suffix}", tmp_path / f"tiny.{suffix}"
    for name, part in ((path, table), (tiny, table.slice(0, 10))):
        if suffix == "parquet":
            pq.write_table(part, name, row_group_size=group_rows, compression="none")
        else:
            with pa.ipc.new_stream(name, table.schema) as writer:
                writer.write_table(part, max_chunksize=ROWS_PER_INPUT_GROUP)
    del table
    arrow_peak, python_peak = peak_bytes_while_writing(str(path), str(tmp_path / "out"), str(tiny))
    file_bytes = ROWS * WIDTH * 4
    assert arrow_peak < file_bytes // 4, (
        f"Arrow held {arrow_peak:,} bytes for a {file_bytes:,} file"
    )
    assert python_peak < file_bytes // 4, f"Python held {python_peak:,} bytes"
    manifest = Manifest.load(str(tmp_path / "out"))
    assert manifest.num_rows == ROWS and len(manifest.shards) > 4
    last = manifest.shards[-1]
    tail = pa.ipc.open_file(tmp_path / "out" / last.path).read_all().column("tokens")
    assert tail[-1].as_py()[-1] == ROWS * WIDTH - 1
