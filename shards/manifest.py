"""The dataset manifest: format version, schema, and per shard its rows, bytes, row groups and checksums.

``manifest.json`` is written last, so a dataset without one is incomplete; this module only reads
and writes that file and never opens a shard.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast, overload

import numpy as np
import pyarrow as pa

from shards.errors import ManifestError
from shards.storage import (
    CHECKSUM_ALGORITHM,
    DatasetLocation,
    check_relative_path,
    format_checksum,
    resolve_location,
)

__all__ = [
    "FORMATS",
    "LIST_VALUE_COUNTS",
    "MANIFEST_NAME",
    "Manifest",
    "RowGroupInfo",
    "ShardInfo",
    "ShardTable",
]

MANIFEST_NAME = "manifest.json"
# metadata key: values in each row group (manifest order) of each variable-length list column
LIST_VALUE_COUNTS = "list_value_counts"
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


_COLUMNS = (
    "_path_ends",
    "rows",
    "sizes",
    "checksums",
    "rg_start",
    "rg_rows",
    "rg_offsets",
    "rg_lengths",
    "rg_checksums",
)
_CHECKSUM = re.compile(rf"{CHECKSUM_ALGORITHM}:[0-9a-f]{{8}}")
# shard paths that are plainly below the root (no "." or ".." segment, no backslash); any other
# path gets the full check
_PLAIN_PATH = re.compile(r"[\w-][\w.-]*(?:/[\w-][\w.-]*)*")


class ShardTable(Sequence[ShardInfo]):
    """Every shard and row group of a manifest as columns: a few numpy arrays instead of an object
    per row group, so 200,000 shards load in about a second, pickle fast to DataLoader workers
    and cost tens of bytes per row group. Indexing builds the ``ShardInfo`` of one shard on demand.

    Row groups are numbered globally, shards in order; shard ``i`` owns row groups
    ``rg_start[i]:rg_start[i + 1]``. Checksums are CRC-32 values.
    """

    def __init__(
        self,
        paths: Sequence[str],
        rows: np.ndarray,
        sizes: np.ndarray,
        checksums: np.ndarray,
        rg_start: np.ndarray,
        rg_rows: np.ndarray,
        rg_offsets: np.ndarray,
        rg_lengths: np.ndarray,
        rg_checksums: np.ndarray,
    ) -> None:
        # all paths in one string (1 byte per ASCII character) with their end offsets, not 200,000
        # str objects scattered among the parsed JSON's: the parser's memory is returned once the
        # JSON is dropped, and workers inherit two objects
        self._path_text = "".join(paths)
        self._path_ends = np.cumsum([len(path) for path in paths], dtype=np.int64)
        self.rows, self.sizes, self.checksums = rows, sizes, checksums
        self.rg_start, self.rg_rows = rg_start, rg_rows
        self.rg_offsets, self.rg_lengths, self.rg_checksums = rg_offsets, rg_lengths, rg_checksums

    @classmethod
    def from_shards(cls, shards: Sequence[ShardInfo]) -> ShardTable:
        groups = [group for shard in shards for group in shard.row_groups]
        counts = [len(shard.row_groups) for shard in shards]
        return cls(
            [shard.path for shard in shards],
            np.asarray([shard.rows for shard in shards], dtype=np.int64),
            np.asarray([shard.bytes for shard in shards], dtype=np.int64),
            _parse_checksums([shard.checksum for shard in shards]),
            np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
            np.asarray([group.rows for group in groups], dtype=np.int64),
            np.asarray([group.offset for group in groups], dtype=np.int64),
            np.asarray([group.length for group in groups], dtype=np.int64),
            _parse_checksums([group.checksum for group in groups]),
        )

    @classmethod
    def from_json(cls, items: Sequence[Mapping[str, Any]]) -> ShardTable:
        """The ``shards`` list of manifest.json (types checked by numpy, values by ``validate``)."""
        row_groups = [item["row_groups"] for item in items]
        flat = [group for groups in row_groups for group in groups]
        if any(len(group) != 4 for group in flat):
            raise ValueError("a row group is not [rows, offset, length, checksum]")
        rg_rows, rg_offsets, rg_lengths, rg_checksums = (
            zip(*flat, strict=True) if flat else ((), (), (), ())
        )
        return cls(
            [str(item["path"]) for item in items],
            _int_column([item["rows"] for item in items]),
            _int_column([item["bytes"] for item in items]),
            _parse_checksums([item["checksum"] for item in items]),
            np.concatenate([[0], np.cumsum([len(g) for g in row_groups], dtype=np.int64)]).astype(
                np.int64
            ),
            _int_column(rg_rows),
            _int_column(rg_offsets),
            _int_column(rg_lengths),
            _parse_checksums(rg_checksums),
        )

    def path(self, index: int) -> str:
        """Shard ``index``'s path relative to the dataset root."""
        start = int(self._path_ends[index - 1]) if index else 0
        return self._path_text[start : int(self._path_ends[index])]

    @property
    def paths(self) -> list[str]:
        ends = self._path_ends.tolist()
        text = self._path_text
        return [text[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def validate(self, where: str, url: str) -> None:
        """Refuses what no writer produces, naming the shard, the field and the value."""
        for path in self.paths:
            if not _PLAIN_PATH.fullmatch(path):
                check_relative_path(path, url or ".")
        for name, values in (("rows", self.rows), ("bytes", self.sizes)):
            bad = np.flatnonzero(values < 0)
            if len(bad):
                raise self._error(where, int(bad[0]), None, name, int(values[bad[0]]))
        owner = np.repeat(np.arange(len(self)), np.diff(self.rg_start))
        for name, values, lowest in (
            ("rows", self.rg_rows, 1),
            ("offset", self.rg_offsets, 0),
            ("length", self.rg_lengths, 1),
        ):
            bad = np.flatnonzero(values < lowest)
            if len(bad):
                group = int(bad[0])
                raise self._error(where, int(owner[group]), group, name, int(values[group]))
        sums = np.zeros(len(self), dtype=np.int64)
        np.add.at(sums, owner, self.rg_rows)
        wrong = np.flatnonzero(sums != self.rows)
        if len(wrong):
            shard = int(wrong[0])
            raise ManifestError(
                f"{where}: shard {self.path(shard)} lists {self.rows[shard]} rows but its row groups "
                f"add up to {sums[shard]}; the manifest was edited or corrupted"
            )

    def _error(
        self, where: str, shard: int, group: int | None, name: str, value: int
    ) -> ManifestError:
        what = f"shard {self.path(shard)}"
        if group is not None:
            what += f" row group {group - int(self.rg_start[shard])}"
        return ManifestError(
            f"{where}: {what} has {name} {value}, which no writer produces; the manifest was "
            "edited or corrupted - rewrite the dataset with `shards write`"
        )

    def __len__(self) -> int:
        return len(self._path_ends)

    @overload
    def __getitem__(self, index: int) -> ShardInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[ShardInfo]: ...

    def __getitem__(self, index: int | slice) -> ShardInfo | list[ShardInfo]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, IndexError past the end
        first, stop = int(self.rg_start[index]), int(self.rg_start[index + 1])
        return ShardInfo(
            path=self.path(index),
            rows=int(self.rows[index]),
            bytes=int(self.sizes[index]),
            checksum=format_checksum(int(self.checksums[index])),
            row_groups=tuple(
                RowGroupInfo(int(r), int(o), int(n), format_checksum(int(c)))
                for r, o, n, c in zip(
                    self.rg_rows[first:stop],
                    self.rg_offsets[first:stop],
                    self.rg_lengths[first:stop],
                    self.rg_checksums[first:stop],
                    strict=True,
                )
            ),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardTable):
            return NotImplemented
        return self._path_text == other._path_text and all(
            np.array_equal(getattr(self, name), getattr(other, name)) for name in _COLUMNS
        )

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> list[dict[str, Any]]:
        return [
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
            for shard in self
        ]


def _int_column(values: Sequence[Any]) -> np.ndarray:
    array = np.asarray(values)
    if len(array) and array.dtype.kind not in "iu":
        raise ValueError(f"expected integers, got {array.dtype} values such as {values[0]!r}")
    return array.astype(np.int64)


def _parse_checksums(values: Sequence[Any]) -> np.ndarray:
    """``crc32:xxxxxxxx`` strings as uint32 values (one hex decode for all of them)."""
    prefix = f"{CHECKSUM_ALGORITHM}:"
    width = len(prefix) + 8
    try:
        if all(type(v) is str and len(v) == width and v.startswith(prefix) for v in values):
            digits = "".join(value[len(prefix) :] for value in values)
            if digits.isalnum() and digits == digits.lower():  # fromhex would skip spaces
                parsed = np.frombuffer(bytes.fromhex(digits), dtype=">u4").astype(np.uint32)
                if len(parsed) == len(values):
                    return parsed
    except ValueError:  # a non-hex digit: found and named below
        pass
    for value in values:
        if not isinstance(value, str) or not _CHECKSUM.fullmatch(value):
            raise ValueError(
                f"checksum {value!r} is not {CHECKSUM_ALGORITHM}: and 8 lowercase hex digits"
            )
    raise AssertionError("unreachable: every checksum matched")


@dataclass(frozen=True)
class Manifest:
    """What ``write_shards`` wrote; ``url`` is where it was loaded from (empty when built in memory).

    ``shards`` is a ``ShardTable`` (a sequence of ``ShardInfo``), whatever sequence was passed.
    """

    format: str
    schema: pa.Schema
    shards: Sequence[ShardInfo]
    format_version: int = FORMAT_VERSION
    url: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.shards, ShardTable):
            object.__setattr__(self, "shards", ShardTable.from_shards(self.shards))

    @property
    def table(self) -> ShardTable:
        return cast(ShardTable, self.shards)

    @property
    def num_rows(self) -> int:
        return int(self.table.rows.sum())

    @property
    def num_bytes(self) -> int:
        return int(self.table.sizes.sum())

    @property
    def num_row_groups(self) -> int:
        return len(self.table.rg_rows)

    def row_group_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per global row group (shards in order): rows, shard index, index within the shard."""
        table = self.table
        counts = np.diff(table.rg_start)
        shard_ids = np.repeat(np.arange(len(table), dtype=np.int64), counts)
        local_ids = np.arange(len(table.rg_rows), dtype=np.int64) - table.rg_start[shard_ids]
        return table.rg_rows.copy(), shard_ids, local_ids

    def list_value_counts(self, column: str) -> np.ndarray | None:
        """Values in each row group of list column ``column`` as the writer counted them, or None
        (not a variable-length list column, or a dataset written before the counts were kept)."""
        counts = self.metadata.get(LIST_VALUE_COUNTS, {}).get(column)
        if counts is None:
            return None
        array = np.asarray(counts, dtype=np.int64)
        if array.shape != (self.num_row_groups,) or (array < 0).any():
            raise ManifestError(
                f"{self.url or '<manifest>'}: metadata {LIST_VALUE_COUNTS}[{column!r}] has "
                f"{len(array)} entries for {self.num_row_groups} row groups (or negative ones); the "
                "manifest was edited or corrupted - rewrite the dataset with `shards write`"
            )
        return array

    def row_group_lengths(self) -> np.ndarray:
        """Bytes of each global row group (shards in order)."""
        return self.table.rg_lengths.copy()

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "format": self.format,
            "num_rows": self.num_rows,
            "num_bytes": self.num_bytes,
            "columns": [{"name": f.name, "type": str(f.type)} for f in self.schema],
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"),
            "metadata": dict(self.metadata),
            "shards": self.table.to_json(),
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
            shards = ShardTable.from_json(data["shards"])
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
            raise ManifestError(
                f"{where}: manifest is malformed ({type(exc).__name__}: {exc}); rewrite it with `shards write`"
            ) from exc
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: unknown shard format {fmt!r}; expected one of {FORMATS}")
        shards.validate(where, url)
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
