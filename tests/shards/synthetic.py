"""Synthetic tables for the shards tests: ``id`` is the row number, ``tokens`` derive from it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["make_table", "write_table_dataset"]


def make_table(num_rows: int, width: int = 4, start: int = 0) -> pa.Table:
    ids = np.arange(start, start + num_rows, dtype=np.int64)
    tokens = (ids[:, None] * width + np.arange(width)).astype(np.int32)
    return pa.table(
        {
            "id": ids,
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), width),
            "weight": (ids % 7).astype(np.float32),
        }
    )


def write_table_dataset(url: str, num_rows: int = 3000, fmt: str = "arrow") -> str:
    """``make_table(num_rows)`` written at ``url`` as several shards of several row groups: 2 KiB
    row groups (~85 rows; finer ones would be too fine), 16 KiB shards (8 row groups each)."""
    from shards import write_shards

    write_shards(
        make_table(num_rows),
        url,
        format=fmt,
        row_group_bytes=2048,
        bytes_per_shard=16384,
        progress=False,
    )
    return url
