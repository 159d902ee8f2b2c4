"""Synthetic tables for the shards tests: ``id`` is the row number, ``tokens`` derive from it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["make_table"]


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
