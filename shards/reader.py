"""Reading row groups: byte ranges from any fsspec store (memory-mapped for local files), each range
checked against its manifest checksum before decoding, readahead on threads within a byte budget.

Columns become numpy arrays without per-row Python: numeric columns 1-D, fixed-size lists N-D,
zero-copy where Arrow allows. This module never decides which rows to read (see ``plan``).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.cache import ShardCache
from shards.errors import ChecksumMismatchError, ManifestError, SchemaDriftError, ShardsError
from shards.manifest import Manifest, RowGroupInfo, ShardInfo
from shards.options import DEFAULT_MAX_OPEN_FILES, ReadOptions
from shards.storage import DatasetLocation, checksum_of
from shards.writer import describe_schema_drift

__all__ = [
    "ProcessReader",
    "RowGroupPrefetcher",
    "ShardReader",
    "column_to_numpy",
    "default_marks_dir",
    "tensor_column_error",
]


def tensor_column_error(field: pa.Field) -> str | None:
    """Why ``field`` has no direct tensor conversion, or None when it has one."""
    type_ = field.type
    while pa.types.is_fixed_size_list(type_):
        type_ = type_.value_type
    if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_):
        return None
    return f"column {field.name!r} has type {field.type}, which has no direct tensor conversion"


def column_to_numpy(array: pa.Array, name: str, where: str) -> np.ndarray:
    """A numpy view of a numeric or (nested) fixed-size-list column: 1-D or N-D, zero-copy if possible."""
    if array.null_count:
        raise ShardsError(
            f"{where}: column {name!r} has {array.null_count} null value(s), which tensors cannot hold; "
            "fill them when writing, or pass transform= to handle them"
        )
    shape: list[int] = [len(array)]
    values = array
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    if pa.types.is_boolean(values.type):
        flat = values.to_numpy(zero_copy_only=False)
    else:
        flat = values.to_numpy(zero_copy_only=True)
    return flat.reshape(shape)


class _RangeFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some verified ranges are present."""

    def __init__(self, size: int, segments: Sequence[tuple[int, Any]], name: str) -> None:
        super().__init__()
        self._size, self._segments, self._name, self._pos = size, segments, name, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        for start, data in self._segments:
            view = memoryview(data)
            if start <= self._pos < start + len(view):
                count = min(want, start + len(view) - self._pos)
                buffer[:count] = view[self._pos - start : self._pos - start + count]
                self._pos += count
                return count
        raise OSError(f"{self._name}: read at {self._pos} falls outside the checked byte ranges")


class _VerifiedMarks:
    """Which row groups of one local file version some process on this node already checked.

    One byte per row group in a small file named by the shard's checksum and the file's identity
    (device, inode, size, mtime): a rewritten or touched file gets a fresh, empty record. Setting a
    byte is idempotent, so concurrent processes need no lock; any OSError just means "check again".
    The record is opened only to read it and to mark a row group, so it holds no file descriptor.
    """

    def __init__(self, directory: str, shard: ShardInfo, path: str) -> None:
        self._path: str | None = None
        self._flags = b""
        try:
            stat = os.stat(path)
            digest = shard.checksum.replace(":", "-")
            name = f"{digest}-{stat.st_dev}-{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"
            os.makedirs(directory, exist_ok=True)
            record = os.path.join(directory, name)
            fd = os.open(record, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                count = len(shard.row_groups)
                if os.fstat(fd).st_size < count:
                    os.ftruncate(fd, count)
                self._flags, self._path = os.pread(fd, count, 0), record
            finally:
                os.close(fd)
        except OSError:
            pass

    def verified(self, index: int) -> bool:
        return index < len(self._flags) and self._flags[index] == 1

    def mark(self, index: int) -> None:
        if self._path is None:
            return
        with contextlib.suppress(OSError):
            fd = os.open(self._path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x01", index)
            finally:
                os.close(fd)


def default_marks_dir() -> str:
    """Node-local record of checked row groups: $TMPDIR/shards-verified-<uid>."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"shards-verified-{os.getuid()}")


def _missing_shard(url: str) -> ShardsError:
    return ShardsError(f"shard {url} is missing; the dataset is incomplete - re-run `shards write`")


class _OpenShard(NamedTuple):
    """A shard checked against the manifest: its bytes (mapped, or None for remote range reads),
    its Parquet footer, the local file (for read-ahead hints) and its record of checked row groups."""

    source: Any
    metadata: Any
    local_path: str | None
    marks: _VerifiedMarks | None


def _advise_willneed(path: str, offset: int, length: int) -> None:
    """Ask the kernel to read a range ahead in one large request (cold page cache).

    The file is opened just for the hint, so open shards hold no descriptor; a file evicted from
    the cache meanwhile simply gets no hint.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class ShardReader:
    """Loads row groups of one dataset as Arrow record batches of the selected ``columns``.

    At most ``max_open_files`` shards stay open (least recently used closed first); a closed
    shard's memory map lives on while a batch still uses its bytes.
    """

    def __init__(
        self,
        manifest: Manifest,
        location: DatasetLocation,
        columns: Sequence[str],
        *,
        cache: ShardCache | None = None,
        verify: bool = True,
        marks_dir: str | None = None,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
    ) -> None:
        if max_open_files <= 0:
            raise ValueError(f"max_open_files ({max_open_files}) must be positive")
        self.manifest, self.location, self.columns = manifest, location, list(columns)
        self.cache, self.verify = cache, verify
        self.marks_dir = marks_dir
        self.max_open_files = max_open_files
        self.checks = 0  # row groups checksummed by this reader
        _rows, shard_ids, local_ids = manifest.row_group_table()
        self.rg_shard, self.rg_local = shard_ids, local_ids
        self.rg_bytes = manifest.row_group_lengths()
        self.bytes_read = 0
        self._opened: OrderedDict[int, _OpenShard] = OrderedDict()  # least recently used first
        self._verified: set[int] = set()
        self._lock = threading.Lock()  # readahead threads open shards and count bytes

    def _url(self, shard: ShardInfo) -> str:
        return self.location.url_of(shard.path)

    @property
    def num_open(self) -> int:
        return len(self._opened)

    def _open(self, shard_id: int) -> _OpenShard:
        """Opens a shard (again, after it was closed): size and schema checked against the manifest."""
        with self._lock:  # one opening (and download) per shard, however many readahead threads
            opened = self._opened.get(shard_id)
            if opened is None:
                opened = self._opened[shard_id] = self._open_shard(shard_id)
                while len(self._opened) > self.max_open_files:
                    self._opened.popitem(last=False)
            else:
                self._opened.move_to_end(shard_id)
            return opened

    def _open_shard(self, shard_id: int) -> _OpenShard:
        shard = self.manifest.shards[shard_id]
        url, remote = self._url(shard), self.location.path_of(shard.path)
        local_path, marks = None, None
        if self.location.local or self.cache is not None:
            if self.location.local:  # local files are read in place, never copied into the cache
                local_path = remote
                try:
                    mapped = pa.memory_map(local_path, "r")
                except FileNotFoundError:
                    raise _missing_shard(url) from None
            else:
                local_path, mapped = self.cache.open(self.location.fs, remote, shard, url)
            try:
                size = mapped.size()
                source: Any = mapped.read_buffer()  # the whole mapping as one zero-copy buffer
            finally:
                mapped.close()  # the mapping outlives its descriptor
            if self.verify and self.marks_dir is not None:
                marks = _VerifiedMarks(self.marks_dir, shard, local_path)
        else:
            source = None
            try:
                size = self.location.fs.size(remote)
            except FileNotFoundError:
                raise _missing_shard(url) from None
        if size != shard.bytes:
            raise ChecksumMismatchError(
                f"shard {url} has {size} bytes, the manifest expects {shard.bytes} (truncated or replaced "
                "after the manifest was written); re-run `shards write`, or `shards verify` to list every bad shard"
            )
        handle = (
            pa.BufferReader(source) if source is not None else self.location.fs.open(remote, "rb")
        )
        try:
            if self.manifest.format == "arrow":
                schema, metadata = pa.ipc.open_file(handle).schema, None
            else:
                metadata = pq.read_metadata(handle)
                schema = metadata.schema.to_arrow_schema()
        except pa.ArrowException as exc:
            raise ChecksumMismatchError(
                f"shard {url}: cannot read its {self.manifest.format} footer ({exc}); the file is corrupt - "
                "re-run `shards write`"
            ) from exc
        finally:
            handle.close()
        if not schema.remove_metadata().equals(self.manifest.schema):
            raise SchemaDriftError(
                f"shard {url}: {describe_schema_drift(self.manifest.schema, schema)}; "
                "the file does not belong to this manifest - re-run `shards write`"
            )
        return _OpenShard(source, metadata, local_path, marks)

    def _read_range(self, opened: _OpenShard, shard: ShardInfo, group: RowGroupInfo) -> Any:
        if opened.source is not None:
            if opened.local_path is not None and hasattr(os, "posix_fadvise"):
                _advise_willneed(opened.local_path, group.offset, group.length)
            data = opened.source.slice(group.offset, group.length)  # zero-copy (read_at copies)
        else:
            data = pa.py_buffer(
                self.location.fs.cat_file(
                    self.location.path_of(shard.path),
                    start=group.offset,
                    end=group.offset + group.length,
                )
            )
        with self._lock:
            self.bytes_read += group.length
        return data

    def load(self, rg_id: int) -> pa.RecordBatch:
        """Row group ``rg_id`` (global, manifest order) with the selected columns."""
        shard_id, rg_local = int(self.rg_shard[rg_id]), int(self.rg_local[rg_id])
        shard = self.manifest.shards[shard_id]
        group = shard.row_groups[rg_local]
        opened = self._open(shard_id)
        if group.offset + group.length > shard.bytes:
            raise ManifestError(
                f"shard {self._url(shard)}: row group {rg_local} spans bytes {group.offset}.."
                f"{group.offset + group.length}, past the file's {shard.bytes} bytes; the manifest "
                "was edited or corrupted - rewrite the dataset with `shards write`"
            )
        data = self._read_range(opened, shard, group)
        marks = opened.marks
        if self.verify and rg_id not in self._verified and not (marks and marks.verified(rg_local)):
            self.checks += 1
            actual = checksum_of(memoryview(data))
            if actual != group.checksum:
                raise ChecksumMismatchError(
                    f"shard {self._url(shard)}: row group {rg_local} (bytes {group.offset}..{group.offset + group.length}) "
                    f"checksum mismatch (expected {group.checksum}, got {actual}); the file changed after the "
                    "manifest was written - re-run `shards write`, or `shards verify` to list every bad shard"
                )
            self._verified.add(rg_id)
            if marks is not None:
                marks.mark(rg_local)
        try:
            if self.manifest.format == "arrow":
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(data), self.manifest.schema)
                batch = batch.select(self.columns)
            else:
                overlay = _RangeFile(shard.bytes, [(group.offset, data)], self._url(shard))
                table = pq.ParquetFile(overlay, metadata=opened.metadata).read_row_group(
                    rg_local, columns=self.columns, use_threads=False
                )
                batch = table.combine_chunks().to_batches()[0]
        except (pa.ArrowException, OSError) as exc:
            raise ChecksumMismatchError(
                f"shard {self._url(shard)}: row group {rg_local} cannot be decoded ({exc}); the file is corrupt - "
                "re-run `shards write`"
            ) from exc
        if batch.num_rows != group.rows:
            raise ChecksumMismatchError(
                f"shard {self._url(shard)}: row group {rg_local} has {batch.num_rows} rows, the manifest "
                f"expects {group.rows}; re-run `shards write`"
            )
        return batch


class RowGroupPrefetcher:
    """Loads row groups on threads ahead of use, keeping loaded + in-flight bytes within a budget.

    ``plan`` yields (item, row group ids it needs) in consumption order; iterating yields
    (item, {rg id: loaded value}) once all of an item's row groups are ready.
    """

    def __init__(
        self,
        load: Callable[[int], Any],
        rg_bytes: np.ndarray,
        *,
        budget_bytes: int,
        num_threads: int = 4,
        lookahead_items: int = 64,
    ) -> None:
        self.load, self.rg_bytes = load, rg_bytes
        self.budget_bytes, self.num_threads = budget_bytes, max(1, num_threads)
        self.lookahead_items = max(1, lookahead_items)
        self.peak_bytes = 0

    def run(
        self, plan: Iterable[tuple[Any, Sequence[int]]]
    ) -> Iterator[tuple[Any, dict[int, Any]]]:
        pending: list[tuple[Any, list[int]]] = []
        head = 0  # pending[head] is the next item to yield
        next_item, next_group = 0, 0  # the first row group not yet submitted
        uses: dict[int, int] = {}  # row group -> pending items that need it
        futures: dict[int, Future[Any]] = {}
        held = 0
        source = iter(plan)
        exhausted = False
        pool = ThreadPoolExecutor(
            max_workers=self.num_threads, thread_name_prefix="shards-readahead"
        )
        try:
            while True:
                while not exhausted and len(pending) - head < self.lookahead_items:
                    try:
                        item, groups = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    groups = [int(g) for g in groups]
                    pending.append((item, groups))
                    for group in groups:
                        uses[group] = uses.get(group, 0) + 1
                if head == len(pending):
                    return
                index, position = max(next_item, head), next_group if next_item >= head else 0
                while index < len(pending):
                    groups = pending[index][1]
                    while position < len(groups):
                        group = groups[position]
                        if group not in futures:
                            size = int(self.rg_bytes[group])
                            if index > head and held + size > self.budget_bytes:
                                break  # over budget: wait until earlier row groups are released
                            futures[group] = pool.submit(self.load, group)
                            held += size
                        position += 1
                    else:
                        index, position = index + 1, 0
                        continue
                    break
                next_item, next_group = index, position
                self.peak_bytes = max(self.peak_bytes, held)
                item, groups = pending[head]
                pending[head] = (None, groups)
                head += 1
                if head > 1024:  # drop consumed items now and then
                    del pending[:head]
                    next_item -= head
                    head = 0
                yield item, {group: futures[group].result() for group in groups}
                for group in groups:
                    uses[group] -= 1
                    if uses[group] == 0:
                        del uses[group]
                        futures.pop(group)
                        held -= int(self.rg_bytes[group])
        finally:
            for future in futures.values():
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


class ProcessReader:
    """A dataset's ``ShardReader``, one per process and kept across epochs, so that shards are
    opened and checked once; it pickles without the reader (open memory maps and locks stay in
    their process) and the receiving process opens its own."""

    def __init__(
        self,
        manifest: Manifest,
        location: DatasetLocation,
        columns: Sequence[str],
        options: ReadOptions,
    ) -> None:
        self.manifest, self.location, self.columns = manifest, location, list(columns)
        self.options = options
        self._reader: tuple[int, ShardReader] | None = None

    def get(self) -> ShardReader:
        if self._reader is not None and self._reader[0] == os.getpid():
            return self._reader[1]
        options = self.options
        cache = (
            ShardCache(options.cache_dir, options.cache_bytes)
            if options.cache_dir is not None
            else None
        )
        marks_dir = (
            os.path.join(options.cache_dir, ".verified")
            if options.cache_dir
            else default_marks_dir()
        )
        reader = ShardReader(
            self.manifest,
            self.location,
            self.columns,
            cache=cache,
            verify=options.verify,
            marks_dir=marks_dir if options.verify_marks else None,
            max_open_files=options.max_open_files,
        )
        self._reader = (os.getpid(), reader)
        return reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}
