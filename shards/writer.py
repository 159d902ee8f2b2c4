"""``write_shards``: turn a table, a stream of batches or rows, a Hugging Face ``datasets.Dataset``, or
existing Parquet/Arrow files into shards.

Output is deterministic for a given input and parameters: rows are cut into row groups of a fixed row
count and shards of a fixed number of row groups, in input order; the manifest is written last. Input
files are streamed a bounded number of bytes at a time, never read whole; column types and schema
metadata are kept as the source has them, except uniform-length lists cast to fixed-size lists.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.errors import SchemaDriftError, ShardsError
from shards.manifest import (
    FORMATS,
    LIST_VALUE_COUNTS,
    MANIFEST_NAME,
    Manifest,
    RowGroupInfo,
    ShardInfo,
    write_atomic,
)
from shards.storage import DatasetLocation, checksum_of, resolve_location

__all__ = [
    "DEFAULT_BYTES_PER_SHARD",
    "DEFAULT_ROW_GROUP_BYTES",
    "FixedLists",
    "ipc_batch_ranges",
    "uniform_list_lengths",
    "write_shards",
]

DEFAULT_BYTES_PER_SHARD = 64 << 20
DEFAULT_ROW_GROUP_BYTES = 2 << 20
_ROWS_PER_DICT_CHUNK = 8192
_PARQUET_BUFFER_BYTES = 1 << 20
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
    fixed_lists: bool | Sequence[str] | None = None,
) -> Manifest:
    """Write ``source`` as shards under ``dest`` (any fsspec URL) and return the manifest.

    ``source``: a pyarrow Table, RecordBatch or RecordBatchReader; an iterable of record batches,
    tables or row dicts; or paths/URLs of Parquet or Arrow files (IPC file or stream format, as in
    Hugging Face ``datasets`` caches), or a directory of them. ``format``: "parquet" (default) or
    "arrow" (IPC, memory-mapped when read locally). ``compression`` defaults to snappy for Parquet and
    none for Arrow (uncompressed IPC is read zero-copy). Row groups hold ``row_group_bytes``
    (default 2 MiB) of uncompressed data, shards about ``bytes_per_shard`` (default 64 MiB).

    ``fixed_lists`` turns list columns of numbers whose lists all have one length (``list<int32>``
    from a tokenizer that pads, as ``datasets`` types it) into fixed-size lists, which read as 2-D
    tensors. ``None`` (default): every such column of a source held whole (Table, RecordBatch,
    ``datasets.Dataset``), checked over all its rows; streamed sources keep their lists. ``True``:
    every list column of numbers, ``False``: none, a list of names: those; a streamed batch that does
    not match the first one's length is refused. Schema metadata (``datasets`` ClassLabel names, for
    one) is kept in the shards and the manifest.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not supported; use one of {FORMATS}")
    if row_group_bytes <= 0 or bytes_per_shard <= 0:
        raise ValueError(
            f"row_group_bytes ({row_group_bytes}) and bytes_per_shard ({bytes_per_shard}) must be positive"
        )
    if isinstance(fixed_lists, str):
        raise TypeError(
            f"fixed_lists={fixed_lists!r}: pass a list of column names, True, False or None"
        )
    if _is_hf_dataset_dict(source):
        raise TypeError(
            f"write_shards got a datasets.DatasetDict with splits {list(source)}; write one split "
            "at a time, e.g. write_shards(dataset_dict['train'], ...)"
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

    whole = _whole_table(source)
    if fixed_lists is None:
        lists = FixedLists(uniform_list_lengths(whole) if whole is not None else {}, explicit=False)
    elif fixed_lists is False:
        lists = FixedLists({}, explicit=False)
    else:
        lists = FixedLists({}, explicit=True, names=None if fixed_lists is True else fixed_lists)
    writer = _ShardWriter(location, format, compression, row_group_bytes, bytes_per_shard)
    report = _progress_reporter(progress, _count_rows(source))
    for label, batch in _iter_source(source, storage_options, row_group_bytes):
        writer.add(label, lists.apply(label, batch))
        report(batch.num_rows)
    writer.finish()
    report(None)
    if not writer.shards:
        raise ShardsError(
            f"{location.url}: the source has no rows; an empty dataset cannot be written"
        )
    counts = writer.list_value_counts
    manifest = Manifest(
        format=format,
        schema=writer.schema,
        shards=tuple(writer.shards),
        url=location.url,
        metadata={LIST_VALUE_COUNTS: counts} if counts else {},
    )
    manifest.save_to(location)
    return manifest


class _ShardWriter:
    """Cuts incoming batches into fixed-size row groups and fixed-count shards. A shard is serialised
    in memory group by group as groups are cut (no batch is kept), then written as one object."""

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
        self.group_rows: list[int] = []  # row groups of the shard being serialised
        self._sink: pa.BufferOutputStream | None = None
        self._file_writer: Any = None
        self.shards: list[ShardInfo] = []
        # values per row group of each variable-length list column (token streams need them)
        self.list_value_counts: dict[str, list[int]] = {}

    def add(self, label: str, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = batch.schema  # its metadata too: ClassLabel names, pandas index...
            self.first_label = label
            self.list_value_counts = {f.name: [] for f in self.schema if _is_variable_list(f.type)}
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
        self.pending.append(batch.replace_schema_metadata(self.schema.metadata))
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
        for name, counts in self.list_value_counts.items():
            counts.append(len(group[0].column(name).flatten()))
        self._serialise(group[0])
        if len(self.group_rows) == self.groups_per_shard:
            self._flush_shard()

    def _serialise(self, group: pa.RecordBatch) -> None:
        assert self.schema is not None
        if self._file_writer is None:
            self._sink = pa.BufferOutputStream()
            if self.format == "arrow":
                options = pa.ipc.IpcWriteOptions(compression=self.compression)
                self._file_writer = pa.ipc.new_file(self._sink, self.schema, options=options)
            else:
                self._file_writer = pq.ParquetWriter(
                    self._sink, self.schema, compression=self.compression, write_statistics=False
                )
        if self.format == "arrow":
            self._file_writer.write_batch(group)
        else:
            self._file_writer.write_batch(group, row_group_size=group.num_rows)
        self.group_rows.append(group.num_rows)

    def finish(self) -> None:
        if self.pending_rows:
            self._cut_group(self.pending_rows)
        if self.group_rows:
            self._flush_shard()

    def _flush_shard(self) -> None:
        assert self._sink is not None
        name = f"shard-{len(self.shards):05d}.{_EXTENSIONS[self.format]}"
        self._file_writer.close()
        data = self._sink.getvalue()
        self._sink = self._file_writer = None
        if self.format == "arrow":
            ranges = ipc_batch_ranges(data)
        else:
            ranges = parquet_row_group_ranges(pq.read_metadata(pa.BufferReader(data)))
        assert len(ranges) == len(self.group_rows), (name, len(ranges), len(self.group_rows))
        row_groups = tuple(
            RowGroupInfo(rows, start, length, checksum_of(memoryview(data)[start : start + length]))
            for rows, (start, length) in zip(self.group_rows, ranges, strict=True)
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
        self.group_rows = []


def _is_variable_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_)


def _is_number(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)


def _list_lengths(column: pa.Array | pa.ChunkedArray) -> tuple[int, int] | None:
    """Shortest and longest list of a list column, or None when a list is null (or no rows)."""
    if column.null_count or len(column) == 0:
        return None
    lengths = pc.list_value_length(column)
    bounds = pc.min_max(lengths)
    return bounds["min"].as_py(), bounds["max"].as_py()


def uniform_list_lengths(table: pa.Table) -> dict[str, int]:
    """List columns of numbers whose lists all have one length (no nulls): name -> that length.

    Reads only the list offsets, so a memory-mapped table is checked without touching its values.
    """
    found = {}
    for field in table.schema:
        if _is_variable_list(field.type) and _is_number(field.type.value_type):
            bounds = _list_lengths(table.column(field.name))
            if bounds is not None and bounds[0] == bounds[1]:
                found[field.name] = bounds[0]
    return found


class FixedLists:
    """Casts list columns to fixed-size lists: the ``lengths`` given, or (``explicit``) the ``names``
    (all list columns of numbers when None) at the length of the first batch that has rows."""

    def __init__(
        self,
        lengths: Mapping[str, int],
        *,
        explicit: bool,
        names: Sequence[str] | None = None,
    ) -> None:
        self.lengths = dict(lengths)
        self.explicit, self.names = explicit, list(names) if names is not None else None
        self.first_label = ""
        self._decided = not explicit

    def _decide(self, label: str, batch: pa.RecordBatch) -> None:
        schema = batch.schema
        if self.names is not None:
            unknown = [name for name in self.names if name not in schema.names]
            if unknown:
                raise ShardsError(
                    f"{label}: fixed_lists names column(s) {unknown} that the source does not have "
                    f"(it has {schema.names})"
                )
        for field in schema:
            if self.names is not None and field.name not in self.names:
                continue
            if not (_is_variable_list(field.type) and _is_number(field.type.value_type)):
                if self.names is not None and not pa.types.is_fixed_size_list(field.type):
                    raise ShardsError(
                        f"{label}: fixed_lists names column {field.name!r} of type {field.type}, "
                        "which is not a list of numbers; leave it out of fixed_lists"
                    )
                continue
            bounds = _list_lengths(batch.column(field.name))
            if bounds is None or bounds[0] != bounds[1]:
                raise ShardsError(self._mismatch(label, field.name, bounds, None))
            self.lengths[field.name] = bounds[0]
        self.first_label, self._decided = label, True

    def _mismatch(
        self, label: str, name: str, bounds: tuple[int, int] | None, length: int | None
    ) -> str:
        found = "null lists" if bounds is None else f"lists of {bounds[0]} to {bounds[1]} values"
        wanted = (
            f"one length ({length}, set by {self.first_label})"
            if length is not None
            else "one length"
        )
        return (
            f"{label}: column {name!r} has {found}, but fixed_lists asks for {wanted}; pad or "
            "truncate the lists when tokenizing, or leave the column out of fixed_lists"
        )

    def apply(self, label: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        if not self._decided:
            if batch.num_rows == 0:
                return batch
            self._decide(label, batch)
        if not self.lengths:
            return batch
        columns, fields = list(batch.columns), list(batch.schema)
        for name, length in self.lengths.items():
            index = batch.schema.get_field_index(name)
            if index < 0 or not _is_variable_list(fields[index].type):
                continue  # missing: the writer names the schema drift
            column = columns[index]
            if len(column):
                bounds = _list_lengths(column)
                if bounds != (length, length):
                    raise ShardsError(self._mismatch(label, name, bounds, length))
            columns[index] = pa.FixedSizeListArray.from_arrays(column.flatten(), length)
            fields[index] = pa.field(
                name, columns[index].type, fields[index].nullable, fields[index].metadata
            )
        return pa.RecordBatch.from_arrays(
            columns, schema=pa.schema(fields, metadata=batch.schema.metadata)
        )


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
    source: Any, storage_options: Mapping[str, Any] | None, read_bytes: int
) -> Iterator[tuple[str, pa.RecordBatch]]:
    if isinstance(source, pa.Table):
        for index, batch in enumerate(source.to_batches(max_chunksize=65536)):
            yield f"table batch {index}", batch
    elif isinstance(source, pa.RecordBatch):
        yield "record batch", source
    elif isinstance(source, pa.RecordBatchReader):
        for index, batch in enumerate(source):
            yield f"reader batch {index}", batch
    elif _is_hf_dataset(source):
        # its Arrow table as it is: no row dicts, no retyping, schema metadata kept
        for index, table in enumerate(source.with_format("arrow").iter(batch_size=65536)):
            for sub, batch in enumerate(table.to_batches()):
                yield f"datasets.Dataset batch {index}.{sub}", batch
    elif isinstance(source, str | os.PathLike):
        yield from _iter_files([os.fspath(source)], storage_options, read_bytes)
    elif (
        isinstance(source, list | tuple)
        and source
        and all(isinstance(s, str | os.PathLike) for s in source)
    ):
        yield from _iter_files([os.fspath(s) for s in source], storage_options, read_bytes)
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
    paths: list[str], storage_options: Mapping[str, Any] | None, read_bytes: int
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
            yield from _iter_one_file(fs, file, label, read_bytes)


def _iter_one_file(
    fs: Any, path: str, label: str, read_bytes: int
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """A file's record batches, read a bounded number of bytes at a time (never the whole file):
    Parquet about ``read_bytes`` decoded per read, Arrow IPC one record batch as written."""
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    handle: Any = pa.OSFile(path) if local else fs.open(path, "rb")
    with handle:
        if path.endswith(".parquet"):
            # pages read through a small buffer: pre-buffering (pyarrow's default) and unbuffered
            # reads both hold whole column chunks, a whole file when it is one row group
            parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=_PARQUET_BUFFER_BYTES)
            rows = _rows_per_read(parquet.metadata, read_bytes)
            for index, batch in enumerate(parquet.iter_batches(batch_size=rows)):
                yield f"{label} batch {index}", batch
            return
        try:
            reader: Any = pa.ipc.open_file(handle)
            batches: Iterator[pa.RecordBatch] = (
                reader.get_batch(i) for i in range(reader.num_record_batches)
            )
        except pa.ArrowInvalid:
            handle.seek(0)
            try:
                batches = iter(pa.ipc.open_stream(handle))  # Hugging Face datasets cache files
            except pa.ArrowInvalid as exc:
                raise ShardsError(
                    f"{label}: neither Parquet nor an Arrow IPC file or stream ({exc}); name Parquet "
                    "files *.parquet and pass only Parquet or Arrow files"
                ) from exc
        for index, batch in enumerate(batches):
            yield f"{label} batch {index}", batch


def _rows_per_read(metadata: pq.FileMetaData, read_bytes: int) -> int:
    """Rows that decode to about ``read_bytes`` (the writer's row group size), at most 65,536."""
    rows = sum(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    decoded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    row_bytes = max(1, decoded // max(1, rows))
    return max(1, min(65536, read_bytes // row_bytes))


def _is_hf_dataset(source: Any) -> bool:
    """A Hugging Face ``datasets.Dataset`` (without importing ``datasets``)."""
    kind = type(source)
    return kind.__module__.startswith("datasets.") and kind.__name__ == "Dataset"


def _is_hf_dataset_dict(source: Any) -> bool:
    kind = type(source)
    return kind.__module__.startswith("datasets.") and kind.__name__ == "DatasetDict"


def _whole_table(source: Any) -> pa.Table | None:
    """The source as one table when it is held whole (checked for uniform lists over every row)."""
    if isinstance(source, pa.Table):
        return source
    if isinstance(source, pa.RecordBatch):
        return pa.Table.from_batches([source])
    if _is_hf_dataset(source):
        # the table behind any indices mapping: its rows are a superset, so lists uniform there
        # are uniform in the dataset
        return source.data.table
    return None


def _count_rows(source: Any) -> int | None:
    if isinstance(source, pa.Table | pa.RecordBatch):
        return source.num_rows
    if _is_hf_dataset(source):
        return len(source)
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
