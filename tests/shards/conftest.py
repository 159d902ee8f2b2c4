"""Small synthetic datasets for the shards tests: ``id`` equals the global row number."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.shards.synthetic import make_table, write_table_dataset


@pytest.fixture
def table() -> pa.Table:
    return make_table(3000)


@pytest.fixture(params=["parquet", "arrow"])
def dataset_url(request, tmp_path, table) -> str:
    return write_table_dataset(str(tmp_path / request.param), len(table), request.param)


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path_factory, monkeypatch):
    """Records of checked row groups go under the test's temporary directory, not the machine's."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmpdir")))
