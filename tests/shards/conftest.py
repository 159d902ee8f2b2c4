"""Small synthetic datasets for the shards tests: ``id`` equals the global row number."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.shards.synthetic import make_table


@pytest.fixture
def table() -> pa.Table:
    return make_table(3000)


@pytest.fixture(params=["parquet", "arrow"])
def dataset_url(request, tmp_path, table) -> str:
    from shards import write_shards

    url = str(tmp_path / request.param)
    # ~13 rows per row group is too fine; 2 KiB groups hold ~85 rows here, 8 row groups per shard
    write_shards(
        table,
        url,
        format=request.param,
        row_group_bytes=2048,
        bytes_per_shard=16384,
        progress=False,
    )
    return url


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path_factory, monkeypatch):
    """Records of checked row groups go under the test's temporary directory, not the machine's."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmpdir")))
