"""``write_shards``: turn a table, a stream of batches or rows, or existing Parquet/Arrow files into shards.

Output is deterministic for a given input and parameters: rows are cut into row groups of a fixed row
count and shards of a fixed number of row groups, in input order; the manifest is written last.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shards.errors import SchemaDriftError, ShardsError
from shards.manifest import FORMATS, MANIFEST_NAME, Manifest, RowGroupInfo, ShardInfo, write_atomic
from shards.storage import DatasetLocation, checksum_of, resolve_location

__all__ = ["DEFAULT_BYTES_PER_SHARD", "DEFAULT_ROW_GROUP_BYTES", "ipc_batch_ranges", "write_shards"]

DEFAULT_BYTES_PER_SHARD = 64 << 20
DEFAULT_ROW_GROUP_BYTES = 2 << 20
_ROWS_PER_DICT_CHUNK = 8192
_FILE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
_EXTENSIONS = {"parquet": "parquet", "arrow": "arrow"}


def write_shards(
    source: Any,
    dest: str,
    *,
    format: str = "parquet",
    bytes_per_shard: int = DEFAULT_BYTES_PER_SHARD,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    compression: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Write ``source`` as shards under ``dest`` (any fsspec URL) and return the manifest.

    ``source``: a pyarrow Table, RecordBatch or RecordBatchReader; an iterable of record batches,
    tables or row dicts; or paths/URLs of Parquet or Arrow files (IPC file or stream format, as in
    Hugging Face ``datasets`` caches), or a directory of them. ``format``: "parquet" (default) or
    "arrow" (IPC, memory-mapped when read locally). ``compression`` defaults to snappy for Parquet and
    none for Arrow (uncompressed IPC is read zero-copy). Row groups hold ``row_group_bytes``
    (default 2 MiB) of uncompressed data, shards about ``bytes_per_shard`` (default 64 MiB).
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not supported; use one of {FORMATS}")
    if row_group_bytes <= 0 or bytes_per_shard <= 0:
        raise ValueError(
            f"row_group_bytes ({row_group_bytes}) and bytes_per_shard ({bytes_per_shard}) must be positive"
        )
    location = resolve_location(dest, storage_options)
    manifest_path = f"{location.root}/{MANIFEST_NAME}"
    if location.fs.exists(manifest_path):
        if not overwrite:
            raise ShardsError(
                f"{location.url_of(MANIFEST_NAME)} already exists; pass overwrite=True (CLI: --overwrite) "
                "to replace the dataset, or choose another destination"
            )
        location.fs.rm_file(
            manifest_path
        )  # readers now see an incomplete dataset, never a mixed one
    if location.local:
        os.makedirs(location.root, exist_ok=True)

    writer = _ShardWriter(location, format, compression, row_group_bytes, bytes_per_shard)
    report = _progress_reporter(progress, _count_rows(source))
    for label, batch in _iter_source(source, storage_options):
        writer.add(label, batch)
        report(batch.num_rows)
    writer.finish()
    report(None)
    if not writer.shards:
        raise ShardsError(
            f"{location.url}: the source has no rows; an empty dataset cannot be written"
        )
    manifest = Manifest(
        format=format, schema=writer.schema, shards=tuple(writer.shards), url=location.url
    )
    manifest.save_to(location)
    return manifest


class _ShardWriter:
    """Cuts incoming batches into fixed-size row groups and fixed-count shards, written in memory first."""

    def __init__(
        self,
        location: DatasetLocation,
        fmt: str,
        compression: str | None,
        row_group_bytes: int,
        bytes_per_shard: int,
    ) -> None:
        self.location = location
        self.format = fmt
        self.compression = (
            compression if compression is not None else ("snappy" if fmt == "parquet" else None)
        )
        self.row_group_bytes = row_group_bytes
        self.bytes_per_shard = bytes_per_shard
        self.schema: pa.Schema | None = None
        self.first_label = ""
        self.rows_per_group = 0
        self.groups_per_shard = 0
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.groups: list[pa.RecordBatch] = []
        self.shards: list[ShardInfo] = []

    def add(self, label: str, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = batch.schema.remove_metadata()
            self.first_label = label
        elif not batch.schema.remove_metadata().equals(self.schema):
            raise SchemaDriftError(
                f"{label}: {describe_schema_drift(self.schema, batch.schema)} "
                f"(the schema was set by {self.first_label}); cast the source to one schema"
            )
        if batch.num_rows == 0:
            return
        if not self.rows_per_group:
            row_bytes = max(1, -(-batch.nbytes // batch.num_rows))
            self.rows_per_group = max(1, self.row_group_bytes // row_bytes)
            self.groups_per_shard = max(
                1, self.bytes_per_shard // (self.rows_per_group * row_bytes)
            )
        self.pending.append(batch.replace_schema_metadata(None))
        self.pending_rows += batch.num_rows
        while self.pending_rows >= self.rows_per_group:
            self._cut_group(self.rows_per_group)

    def _cut_group(self, rows: int) -> None:
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        group = table.slice(0, rows).combine_chunks().to_batches()
        assert len(group) == 1, "a combined table slice is one batch"
        rest = table.slice(rows)
        self.pending = rest.to_batches() if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.groups.append(group[0])
        if len(self.groups) == self.groups_per_shard:
            self._flush_shard()

    def finish(self) -> None:
        if self.pending_rows:
            self._cut_group(self.pending_rows)
        if self.groups:
            self._flush_shard()

    def _flush_shard(self) -> None:
        assert self.schema is not None
        name = f"shard-{len(self.shards):05d}.{_EXTENSIONS[self.format]}"
        sink = pa.BufferOutputStream()
        if self.format == "arrow":
            options = pa.ipc.IpcWriteOptions(compression=self.compression)
            with pa.ipc.new_file(sink, self.schema, options=options) as ipc:
                for group in self.groups:
                    ipc.write_batch(group)
            data = sink.getvalue()
            ranges = ipc_batch_ranges(data)
        else:
            with pq.ParquetWriter(
                sink, self.schema, compression=self.compression, write_statistics=False
            ) as pw:
                for group in self.groups:
                    pw.write_batch(group, row_group_size=group.num_rows)
            data = sink.getvalue()
            ranges = parquet_row_group_ranges(pq.read_metadata(pa.BufferReader(data)))
        assert len(ranges) == len(self.groups), (name, len(ranges), len(self.groups))
        row_groups = tuple(
            RowGroupInfo(
                group.num_rows, start, length, checksum_of(memoryview(data)[start : start + length])
            )
            for group, (start, length) in zip(self.groups, ranges, strict=True)
        )
        write_atomic(self.location, self.location.path_of(name), memoryview(data))
        self.shards.append(
            ShardInfo(
                path=name,
                rows=sum(group.rows for group in row_groups),
                bytes=data.size,
                checksum=checksum_of(memoryview(data)),
                row_groups=row_groups,
            )
        )
        self.groups = []


def ipc_batch_ranges(data: pa.Buffer) -> list[tuple[int, int]]:
    """Byte ranges of the record-batch messages of an Arrow IPC file held in ``data``."""
    reader = pa.BufferReader(data)
    reader.seek(8)  # "ARROW1" magic and padding
    messages = pa.ipc.MessageReader.open_stream(reader)
    ranges = []
    while True:
        start = reader.tell()
        try:
            message = messages.read_next_message()
        except StopIteration:
            break
        if message is None:
            break
        if message.type == "dictionary":
            raise ShardsError(
                "dictionary-encoded columns are not supported in Arrow shards; cast them first"
            )
        if message.type == "record batch":
            ranges.append((start, reader.tell() - start))
    return ranges


def parquet_row_group_ranges(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """Byte ranges that hold each row group's column chunks."""
    ranges = []
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        starts, ends = [], []
        for column in range(group.num_columns):
            chunk = group.column(column)
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                start = min(start, chunk.dictionary_page_offset)
            starts.append(start)
            ends.append(start + chunk.total_compressed_size)
        ranges.append((min(starts), max(ends) - min(starts)))
    return ranges


def describe_schema_drift(expected: pa.Schema, actual: pa.Schema) -> str:
    """Names the columns that differ between two schemas."""
    expected_types = {f.name: f.type for f in expected}
    actual_types = {f.name: f.type for f in actual}
    parts = []
    missing = [name for name in expected_types if name not in actual_types]
    extra = [name for name in actual_types if name not in expected_types]
    if missing:
        parts.append(f"missing column(s) {missing}")
    if extra:
        parts.append(f"unexpected column(s) {extra}")
    for name, type_ in expected_types.items():
        if name in actual_types and actual_types[name] != type_:
            parts.append(f"column {name!r} has type {actual_types[name]}, expected {type_}")
    if not parts:
        parts.append(f"column order or nullability differs: {actual.names} vs {expected.names}")
    return "schema drift: " + "; ".join(parts)


def _iter_source(
    source: Any, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[str, pa.RecordBatch]]:
    if isinstance(source, pa.Table):
        for index, batch in enumerate(source.to_batches(max_chunksize=65536)):
            yield f"table batch {index}", batch
    elif isinstance(source, pa.RecordBatch):
        yield "record batch", source
    elif isinstance(source, pa.RecordBatchReader):
        for index, batch in enumerate(source):
            yield f"reader batch {index}", batch
    elif isinstance(source, str | os.PathLike):
        yield from _iter_files([os.fspath(source)], storage_options)
    elif (
        isinstance(source, list | tuple)
        and source
        and all(isinstance(s, str | os.PathLike) for s in source)
    ):
        yield from _iter_files([os.fspath(s) for s in source], storage_options)
    elif isinstance(source, Iterable):
        yield from _iter_items(source)
    else:
        raise TypeError(
            f"write_shards cannot read a source of type {type(source).__name__}; pass a pyarrow Table, "
            "RecordBatchReader, an iterable of record batches or row dicts, or Parquet/Arrow file paths"
        )


def _iter_items(items: Iterable[Any]) -> Iterator[tuple[str, pa.RecordBatch]]:
    rows: list[Mapping[str, Any]] = []
    row_schema: pa.Schema | None = None
    first_row = 0
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            if not rows:
                first_row = index
            rows.append(item)
            if len(rows) == _ROWS_PER_DICT_CHUNK:
                batch = _rows_to_batch(rows, row_schema, first_row)
                row_schema = batch.schema
                yield f"rows {first_row}..{index}", batch
                rows = []
            continue
        if rows:
            yield f"rows {first_row}..{index - 1}", _rows_to_batch(rows, row_schema, first_row)
            rows = []
        if isinstance(item, pa.RecordBatch):
            yield f"item {index}", item
        elif isinstance(item, pa.Table):
            for sub, batch in enumerate(item.to_batches(max_chunksize=65536)):
                yield f"item {index} batch {sub}", batch
        else:
            raise TypeError(
                f"source item {index} is a {type(item).__name__}; items must be record batches, tables "
                "or row dicts"
            )
    if rows:
        yield (
            f"rows {first_row}..{first_row + len(rows) - 1}",
            _rows_to_batch(rows, row_schema, first_row),
        )


def _rows_to_batch(
    rows: list[Mapping[str, Any]], schema: pa.Schema | None, first_row: int
) -> pa.RecordBatch:
    try:
        return pa.RecordBatch.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
        raise SchemaDriftError(
            f"rows from {first_row}: do not fit the schema inferred from the first rows ({exc}); "
            "give every row the same keys and value types"
        ) from exc


def _iter_files(
    paths: list[str], storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[str, pa.RecordBatch]]:
    import fsspec.core

    for path in paths:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        if fs.isdir(root):
            files = sorted(p for p in fs.find(root) if p.endswith(_FILE_SUFFIXES))
            if not files:
                raise ShardsError(
                    f"{path}: directory has no {'/'.join(_FILE_SUFFIXES)} files to read"
                )
        else:
            files = [root]
        for file in files:
            label = file if "://" not in path else f"{path.split('://')[0]}://{file}"
            yield from _iter_one_file(fs, file, label)


def _iter_one_file(fs: Any, path: str, label: str) -> Iterator[tuple[str, pa.RecordBatch]]:
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for index, batch in enumerate(parquet.iter_batches(batch_size=65536)):
                yield f"{label} batch {index}", batch
        return
    with fs.open(path, "rb") as handle:
        data = pa.py_buffer(handle.read())
    try:
        reader: Any = pa.ipc.open_file(data)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            batches = iter(pa.ipc.open_stream(data))  # Hugging Face datasets cache files
        except pa.ArrowInvalid as exc:
            raise ShardsError(
                f"{label}: neither Parquet nor an Arrow IPC file or stream ({exc}); name Parquet files "
                "*.parquet and pass only Parquet or Arrow files"
            ) from exc
    for index, batch in enumerate(batches):
        yield f"{label} batch {index}", batch


def _count_rows(source: Any) -> int | None:
    if isinstance(source, pa.Table | pa.RecordBatch):
        return source.num_rows
    return None


def _progress_reporter(enabled: bool, total: int | None) -> Callable[[int | None], None]:
    """tqdm when installed, else one line per ~10% (or per million rows) on stderr."""
    if not enabled:
        return lambda rows: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, unit="rows", unit_scale=True, desc="shards write")

        def update(rows: int | None) -> None:
            if rows is None:
                bar.close()
            else:
                bar.update(rows)

        return update
    done = [0, 0]
    step = max(1, total // 10) if total else 1_000_000

    def report(rows: int | None) -> None:
        if rows is None:
            print(f"shards write: {done[0]:,} rows", file=sys.stderr)
            return
        done[0] += rows
        if done[0] - done[1] >= step:
            done[1] = done[0]
            suffix = f"/{total:,}" if total else ""
            print(f"shards write: {done[0]:,}{suffix} rows", file=sys.stderr)

    return report
