"""The dataset manifest: format version, schema, and per shard its rows, bytes, row groups and checksums.

``manifest.json`` is written last, so a dataset without one is incomplete; this module only reads
and writes that file and never opens a shard.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from shards.errors import ManifestError
from shards.storage import DatasetLocation, check_relative_path, resolve_location

__all__ = ["FORMATS", "MANIFEST_NAME", "Manifest", "RowGroupInfo", "ShardInfo"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("parquet", "arrow")


@dataclass(frozen=True)
class RowGroupInfo:
    """A row group (Parquet) or record batch (Arrow IPC): its rows and the byte range that holds it."""

    rows: int
    offset: int
    length: int
    checksum: str


@dataclass(frozen=True)
class ShardInfo:
    """One shard file, ``path`` relative to the dataset root."""

    path: str
    rows: int
    bytes: int
    checksum: str
    row_groups: tuple[RowGroupInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """What ``write_shards`` wrote; ``url`` is where it was loaded from (empty when built in memory)."""

    format: str
    schema: pa.Schema
    shards: tuple[ShardInfo, ...]
    format_version: int = FORMAT_VERSION
    url: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def num_row_groups(self) -> int:
        return sum(len(shard.row_groups) for shard in self.shards)

    def row_group_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per global row group (shards in order): rows, shard index, index within the shard."""
        rows, shard_ids, local_ids = [], [], []
        for shard_id, shard in enumerate(self.shards):
            for local_id, group in enumerate(shard.row_groups):
                rows.append(group.rows)
                shard_ids.append(shard_id)
                local_ids.append(local_id)
        return (
            np.asarray(rows, dtype=np.int64),
            np.asarray(shard_ids, dtype=np.int64),
            np.asarray(local_ids, dtype=np.int64),
        )

    def row_group_lengths(self) -> np.ndarray:
        """Bytes of each global row group (shards in order)."""
        return np.asarray(
            [group.length for shard in self.shards for group in shard.row_groups], dtype=np.int64
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "format": self.format,
            "num_rows": self.num_rows,
            "num_bytes": self.num_bytes,
            "columns": [{"name": f.name, "type": str(f.type)} for f in self.schema],
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"),
            "metadata": dict(self.metadata),
            "shards": [
                {
                    "path": shard.path,
                    "rows": shard.rows,
                    "bytes": shard.bytes,
                    "checksum": shard.checksum,
                    "row_groups": [
                        [group.rows, group.offset, group.length, group.checksum]
                        for group in shard.row_groups
                    ],
                }
                for shard in self.shards
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], url: str = "") -> Manifest:
        where = url or "<manifest>"
        try:
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise ManifestError(
                    f"{where}: manifest format_version {version} is not supported (this shards reads "
                    f"version {FORMAT_VERSION}); rewrite the dataset with this version's `shards write`"
                )
            fmt = str(data["format"])
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["schema"])))
            shards = tuple(
                ShardInfo(
                    path=str(item["path"]),
                    rows=int(item["rows"]),
                    bytes=int(item["bytes"]),
                    checksum=str(item["checksum"]),
                    row_groups=tuple(
                        RowGroupInfo(int(r), int(o), int(n), str(c))
                        for r, o, n, c in item["row_groups"]
                    ),
                )
                for item in data["shards"]
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
            raise ManifestError(
                f"{where}: manifest is malformed ({type(exc).__name__}: {exc}); rewrite it with `shards write`"
            ) from exc
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: unknown shard format {fmt!r}; expected one of {FORMATS}")
        for shard in shards:
            check_relative_path(shard.path, url or ".")
            if sum(group.rows for group in shard.row_groups) != shard.rows:
                raise ManifestError(
                    f"{where}: shard {shard.path} lists {shard.rows} rows but its row groups add up to "
                    f"{sum(g.rows for g in shard.row_groups)}; the manifest was edited or corrupted"
                )
        manifest = cls(
            format=fmt,
            schema=schema,
            shards=shards,
            format_version=version,
            url=url,
            metadata=dict(data.get("metadata", {})),
        )
        if manifest.num_rows == 0:
            raise ManifestError(f"{where}: the dataset is empty (0 rows); write at least one row")
        return manifest

    @classmethod
    def load(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
        """Read ``<url>/manifest.json`` (``url`` is the dataset root, any fsspec URL)."""
        return cls.load_from(resolve_location(url, storage_options))

    @classmethod
    def load_from(cls, location: DatasetLocation) -> Manifest:
        path = f"{location.root.rstrip('/')}/{MANIFEST_NAME}"
        manifest_url = location.url_of(MANIFEST_NAME)
        try:
            raw = location.fs.cat_file(path)
        except FileNotFoundError:
            raise ManifestError(
                f"{manifest_url}: no manifest; either {location.url} is not a shards dataset or its "
                "writer did not finish (the manifest is written last) - run `shards write` again"
            ) from None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(
                f"{manifest_url}: not valid JSON ({exc}); rewrite it with `shards write`"
            ) from exc
        return cls.from_json(data, url=location.url)

    def save_to(self, location: DatasetLocation) -> None:
        """Write the manifest as one object (atomic on object stores; temp + rename locally)."""
        payload = json.dumps(self.to_json(), indent=1, sort_keys=True).encode()
        path = f"{location.root.rstrip('/')}/{MANIFEST_NAME}"
        write_atomic(location, path, payload)

    def shard_url(self, shard: ShardInfo) -> str:
        return f"{self.url}/{shard.path}" if self.url else shard.path


def write_atomic(location: DatasetLocation, path: str, payload: bytes | Sequence[Any]) -> None:
    """Write bytes (or a list of buffers) to ``path`` so that readers never see a partial file."""
    chunks = [payload] if isinstance(payload, bytes | bytearray | memoryview) else list(payload)
    if location.local:
        import os
        import tempfile

        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with location.fs.open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
