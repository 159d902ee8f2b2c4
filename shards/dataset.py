"""``ShardedDataset`` and ``ShardedLoader``: this rank's batches of a shards dataset as dicts of tensors,
exactly once per epoch across ranks and workers, resumable at any world size from a small state.

The dataset owns the epoch cursor; the loader counts what the training loop consumed in the main
process, so prefetched batches are never counted. This module imports torch; ``shards`` itself does not.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.cache import ShardCache
from shards.errors import ShardsError
from shards.manifest import Manifest
from shards.plan import (
    Cursor,
    EpochOrder,
    Split,
    batches_positions,
    fresh_cursor,
    make_split,
    rebase_cursor,
    worker_batch_indices,
)
from shards.reader import (
    RowGroupPrefetcher,
    ShardReader,
    column_to_numpy,
    default_marks_dir,
    tensor_column_error,
)
from shards.storage import resolve_location

__all__ = ["INDEX_KEY", "PADDING_KEY", "ShardedDataset", "ShardedLoader", "default_world"]

logger = logging.getLogger("shards")

INDEX_KEY = "_index"  # global row ids (manifest order), with with_index=True
PADDING_KEY = (
    "_padding"  # True for repeated samples that fill the last batches, with drop_last=False
)
STATE_VERSION = 1
DEFAULT_READAHEAD_BYTES = 256 << 20
_PLAN_CHUNK_BATCHES = 32  # batches planned per vectorised step


class _World:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def default_world() -> Any:
    """This process's rank and world size: torch.distributed when initialised, else RANK/WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size())
    return _World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


class ShardedDataset(IterableDataset):
    """This rank's batches (dicts of tensors) of the dataset at ``url`` (any fsspec URL).

    Every rank gets the same number of batches (``len()``); each sample of an epoch is delivered once
    across ranks and workers. The remainder that cannot fill a batch on every rank is dropped and
    reported (``num_dropped``), or with ``drop_last=False`` filled with repeated samples flagged in
    ``batch["_padding"]``. Defaults: ``shuffle=True`` (row groups permuted, rows permuted within
    blocks of ``block_rows``, default ~1% of the dataset), ``seed=0``, all columns, ``world`` from the
    environment, no cache (``cache_dir`` caches remote shards locally, at most ``cache_bytes``),
    readahead of ``readahead_bytes`` (256 MiB) per reading process. Every row group read is checked
    against its manifest checksum (``verify=True``); for local and cached files the check is
    remembered per node and file version (``verify_marks``, tiny files under $TMPDIR or
    ``cache_dir``), so DataLoader workers and later epochs skip row groups already checked.
    ``transform`` receives each batch as a pyarrow RecordBatch and returns what to yield, for
    columns tensors cannot hold.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int,
        columns: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        world: Any = None,
        cache_dir: str | None = None,
        cache_bytes: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        block_rows: int | None = None,
        transform: Callable[[pa.RecordBatch], Any] | None = None,
        with_index: bool = False,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        readahead_threads: int = 4,
        verify: bool = True,
        verify_marks: bool = True,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) must be positive")
        self.url = str(url)
        self.location = resolve_location(self.url, storage_options)
        self.manifest = Manifest.load_from(self.location)
        names = self.manifest.schema.names
        self.columns = list(columns) if columns is not None else list(names)
        unknown = [name for name in self.columns if name not in names]
        if unknown:
            raise ShardsError(
                f"dataset {self.url}: unknown column(s) {unknown}; the dataset has {names}"
            )
        if transform is None:
            problems = [
                tensor_column_error(self.manifest.schema.field(name)) for name in self.columns
            ]
            problems = [p for p in problems if p]
            if problems:
                raise ShardsError(
                    f"dataset {self.url}: {'; '.join(problems)}; leave it out with columns=[...] or pass "
                    "transform= to turn the Arrow batch into tensors yourself"
                )
        self.world = world if world is not None else default_world()
        if not 0 <= self.world.rank < self.world.world_size:
            raise ValueError(
                f"rank {self.world.rank} is outside the world of {self.world.world_size}"
            )
        self.batch_size, self.shuffle, self.seed, self.drop_last = (
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.transform, self.with_index, self.verify = transform, with_index, verify
        self.verify_marks = verify_marks
        self.cache_dir, self.cache_bytes = cache_dir, cache_bytes
        if cache_bytes is not None and cache_dir is None:
            raise ValueError("cache_bytes needs cache_dir: the directory the cache lives in")
        self.readahead_bytes, self.readahead_threads = readahead_bytes, readahead_threads
        self.rg_rows, _, _ = self.manifest.row_group_table()
        self.block_rows = block_rows
        num_rows = self.manifest.num_rows
        share = num_rows // self.world.world_size
        if drop_last and share < batch_size:
            raise ShardsError(
                f"dataset {self.url}: batch_size {batch_size} is larger than a rank's share "
                f"({num_rows} rows / {self.world.world_size} ranks = {share}); lower batch_size, use "
                "fewer ranks, or pass drop_last=False to pad"
            )
        self._cursor = fresh_cursor(num_rows, 0, self.world.world_size, batch_size, drop_last)
        self._finished_here = False
        self._reported_epoch = -1
        self._order: EpochOrder | None = None
        self.reader_stats: dict[str, int] = {}

    # -- epoch and state ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``; a no-op when the cursor is already in it (e.g. after a resume)."""
        if epoch != self._cursor.epoch:
            self._restart(epoch)

    def _restart(self, epoch: int) -> None:
        self._cursor = fresh_cursor(
            self.manifest.num_rows, epoch, self.world.world_size, self.batch_size, self.drop_last
        )
        self._finished_here = False

    def order(self) -> EpochOrder:
        if self._order is None or self._order.epoch != self._cursor.epoch:
            self._order = EpochOrder(
                self.rg_rows,
                seed=self.seed,
                epoch=self._cursor.epoch,
                shuffle=self.shuffle,
                block_rows=self.block_rows,
            )
        return self._order

    def split(self) -> Split:
        return make_split(self._cursor)

    def __len__(self) -> int:
        """Batches per rank in the current epoch (after a resume: those left at the last split)."""
        return self.split().num_batches

    @property
    def num_dropped(self) -> int:
        """Samples of this epoch that no rank receives (drop_last), reported, never silent."""
        return self.split().num_dropped

    @property
    def consumed_batches(self) -> int:
        return self._cursor.consumed // self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, bools and lists: the epoch cursor, identical on every rank in lock-step training."""
        cursor = self._cursor
        return {
            "version": STATE_VERSION,
            "num_rows": self.manifest.num_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_rows": self.order().block_rows,
            "epoch": cursor.epoch,
            "intervals": [[a, b] for a, b in cursor.intervals],
            "world_size": cursor.world_size,
            "batch_size": cursor.batch_size,
            "drop_last": cursor.drop_last,
            "consumed": cursor.consumed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()`` of any rank of any world size: the rest of that epoch follows."""
        expected = {
            "version": STATE_VERSION,
            "num_rows": self.manifest.num_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ShardsError(
                    f"dataset {self.url}: the loader state has {key}={state.get(key)!r} but this dataset has "
                    f"{value!r}; resume with the same dataset, seed and shuffle setting"
                )
        if state["block_rows"] != self.order().block_rows and self.block_rows is None:
            self.block_rows = int(state["block_rows"])
        elif state["block_rows"] != self.order().block_rows:
            raise ShardsError(
                f"dataset {self.url}: the loader state has block_rows={state['block_rows']} but this dataset "
                f"has {self.block_rows}; resume with the same block_rows"
            )
        cursor = Cursor(
            epoch=int(state["epoch"]),
            intervals=tuple((int(a), int(b)) for a, b in state["intervals"]),
            world_size=int(state["world_size"]),
            batch_size=int(state["batch_size"]),
            drop_last=bool(state["drop_last"]),
            consumed=int(state["consumed"]),
        )
        make_split(cursor)  # validates consumed against the saved split
        self._cursor = rebase_cursor(cursor, self.world.world_size, self.batch_size, self.drop_last)
        self._order = None
        self._finished_here = False

    def _advance(self, batches: int) -> None:
        cursor = self._cursor
        self._cursor = Cursor(
            cursor.epoch,
            cursor.intervals,
            cursor.world_size,
            cursor.batch_size,
            cursor.drop_last,
            cursor.consumed + batches * self.batch_size,
        )

    def _begin_iteration(self) -> tuple[Cursor, int]:
        """The cursor to read from and the first batch; restarts an epoch this object already finished."""
        split = self.split()
        if self._finished_here and self.consumed_batches >= split.num_batches:
            self._restart(self._cursor.epoch)
            split = self.split()
        if (
            split.num_dropped
            and self.world.rank == 0
            and self._reported_epoch != self._cursor.epoch
        ):
            self._reported_epoch = self._cursor.epoch
            logger.warning(
                "shards %s epoch %d: %d sample(s) dropped so that every rank gets %d batches of %d "
                "(drop_last=True; pass drop_last=False to pad instead)",
                self.url,
                self._cursor.epoch,
                split.num_dropped,
                split.num_batches,
                self.batch_size,
            )
        return self._cursor, self.consumed_batches

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        """Direct iteration counts every yielded batch as consumed (use ``ShardedLoader`` for workers)."""
        cursor, start = self._begin_iteration()
        info = get_worker_info()
        if (
            info is not None
        ):  # a plain DataLoader: cannot count in the main process, refuse to guess
            raise ShardsError(
                "ShardedDataset under a plain DataLoader with workers cannot count consumed batches; "
                "wrap it in shards.ShardedLoader(dataset, num_workers=...)"
            )
        for batch in self._batches(cursor, start, 0, 1):
            self._advance(1)
            yield batch
        self._finished_here = True

    def _batches(
        self,
        cursor: Cursor,
        start: int,
        worker_id: int,
        num_workers: int,
        ring: _SlotRing | None = None,
    ) -> Iterator[Any]:
        """Batches ``start, start + num_workers, ...`` of this rank for worker ``worker_id``."""
        split = make_split(cursor)
        order = self.order()
        assert order.epoch == cursor.epoch
        reader = self._process_reader()
        cache = reader.cache
        bytes_before = reader.bytes_read
        hits_before, misses_before = (cache.hits, cache.misses) if cache else (0, 0)

        def load(group: int) -> Any:
            batch = reader.load(group)
            if self.transform is not None:
                return batch
            where = f"dataset {self.url}"
            return {name: column_to_numpy(batch.column(name), name, where) for name in self.columns}

        rank = self.world.rank

        def plan() -> Iterator[tuple[Any, list[int]]]:
            size = self.batch_size
            indices = worker_batch_indices(split.num_batches, start, worker_id, num_workers)
            for first in range(0, len(indices), _PLAN_CHUNK_BATCHES):
                chunk = indices[first : first + _PLAN_CHUNK_BATCHES]
                positions, padding = batches_positions(split, rank, chunk)
                groups, rows = order.locate(positions)
                # within each batch, each row group's rows together and in file order: one
                # gather per row group (a batch's order of samples carries no meaning)
                batch_ids = np.repeat(np.arange(len(chunk)), size)
                key = np.lexsort((rows, groups, batch_ids))
                groups, rows, padding = groups[key], rows[key], padding[key]
                for j in range(len(chunk)):
                    g = groups[j * size : (j + 1) * size]
                    distinct = g[np.concatenate(([True], g[1:] != g[:-1]))]
                    part = slice(j * size, (j + 1) * size)
                    yield (g, rows[part], padding[part]), distinct.tolist()

        prefetcher = RowGroupPrefetcher(
            load,
            reader.rg_bytes,
            budget_bytes=self.readahead_bytes,
            num_threads=self.readahead_threads,
            lookahead_items=max(
                2, self.readahead_bytes // max(1, self.batch_size * self._row_bytes())
            ),
        )
        try:
            for count, ((groups, rows, padding), loaded) in enumerate(prefetcher.run(plan())):
                if ring is None:
                    yield self._assemble(groups, rows, padding, loaded, order)
                else:
                    slot = ring.acquire(worker_id, count)
                    self._assemble(groups, rows, padding, loaded, order, ring.numpy_slot(slot))
                    yield {_SLOT_KEY: slot}
        finally:
            self.reader_stats = {
                "bytes_read": reader.bytes_read - bytes_before,
                "peak_readahead_bytes": prefetcher.peak_bytes,
                "cache_hits": (cache.hits - hits_before) if cache else 0,
                "cache_misses": (cache.misses - misses_before) if cache else 0,
            }

    def _process_reader(self) -> ShardReader:
        """One reader per process, kept across epochs: shards are opened and checked once."""
        held = self.__dict__.get("_reader")
        if held is not None and held[0] == os.getpid():
            return held[1]
        cache = ShardCache(self.cache_dir, self.cache_bytes) if self.cache_dir is not None else None
        marks_dir = (
            os.path.join(self.cache_dir, ".verified") if self.cache_dir else default_marks_dir()
        )
        reader = ShardReader(
            self.manifest,
            self.location,
            self.columns,
            cache=cache,
            verify=self.verify,
            marks_dir=marks_dir if self.verify_marks else None,
        )
        self._reader = (os.getpid(), reader)
        return reader

    def __getstate__(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "_reader": None,
        }  # open memory maps and locks stay in their process

    def _row_bytes(self) -> int:
        return max(1, self.manifest.num_bytes // max(1, self.manifest.num_rows))

    def _assemble(
        self,
        groups: np.ndarray,
        rows: np.ndarray,
        padding: np.ndarray,
        loaded: Mapping[int, Any],
        order: EpochOrder,
        outputs: Mapping[str, np.ndarray] | None = None,
    ) -> Any:
        """The batch as a dict of tensors; written into ``outputs`` (shared slots) when given."""
        bounds = np.flatnonzero(np.diff(groups)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [len(groups)]])
        if self.transform is not None:
            parts = [
                loaded[int(groups[a])].take(pa.array(rows[a:b]))
                for a, b in zip(starts, stops, strict=True)
            ]
            result = self.transform(pa.Table.from_batches(parts).combine_chunks().to_batches()[0])
        else:
            result = {}
            for name in self.columns:
                views = {group: arrays[name] for group, arrays in loaded.items()}
                first = views[int(groups[0])]
                if outputs is not None:
                    out = outputs[name]
                else:
                    out = np.empty((len(groups), *first.shape[1:]), dtype=first.dtype)
                for a, b in zip(starts, stops, strict=True):
                    view, src = views[int(groups[a])], rows[a:b]
                    if src[-1] - src[0] == b - a - 1:  # consecutive rows: one memcpy
                        out[a:b] = view[src[0] : src[-1] + 1]
                    else:
                        np.take(
                            view, src, axis=0, out=out[a:b], mode="clip"
                        )  # "raise" would buffer
                result[name] = torch.from_numpy(out)
        if isinstance(result, dict):
            if self.with_index:
                result[INDEX_KEY] = torch.from_numpy(order.rg_offsets[groups] + rows)
            if not self.drop_last:
                result[PADDING_KEY] = torch.from_numpy(padding.copy())
            if outputs is not None:
                for key in (INDEX_KEY, PADDING_KEY):
                    if key in result:
                        outputs[key][...] = result[key].numpy()
        return result

    def _batch_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor in a batch (tensor columns only, no transform)."""
        layout = {}
        for name in self.columns:
            type_, shape = self.manifest.schema.field(name).type, [self.batch_size]
            while pa.types.is_fixed_size_list(type_):
                shape.append(type_.list_size)
                type_ = type_.value_type
            dtype = (
                np.dtype(bool) if pa.types.is_boolean(type_) else np.dtype(type_.to_pandas_dtype())
            )
            layout[name] = (tuple(shape), torch.from_numpy(np.empty(0, dtype)).dtype)
        if self.with_index:
            layout[INDEX_KEY] = ((self.batch_size,), torch.int64)
        if not self.drop_last:
            layout[PADDING_KEY] = ((self.batch_size,), torch.bool)
        return layout


class _WorkerView(IterableDataset):
    """What DataLoader workers iterate: a snapshot of the dataset's cursor, never counted there."""

    def __init__(
        self, dataset: ShardedDataset, cursor: Cursor, start: int, ring: _SlotRing | None
    ) -> None:
        super().__init__()
        self.dataset, self.cursor, self.start, self.ring = dataset, cursor, start, ring

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        yield from self.dataset._batches(self.cursor, self.start, worker_id, num_workers, self.ring)


_SLOT_KEY = "_shards_slot"


class _SlotRing:
    """Batch-sized shared-memory slots, ``per_worker`` for each worker, allocated once per iteration.

    Workers write batches into their own slots and send only the slot number; the main process
    copies a slot out and counts it, and a worker reuses a slot only after that copy. This replaces
    a fresh shared-memory segment per batch, which costs more than the batch's bytes.
    """

    def __init__(
        self,
        layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        num_workers: int,
        per_worker: int,
    ) -> None:
        self.per_worker = per_worker
        total = num_workers * per_worker
        self.tensors = {
            name: torch.empty((total, *shape), dtype=dtype).share_memory_()
            for name, (shape, dtype) in layout.items()
        }
        self.copied = torch.zeros(num_workers, dtype=torch.int64).share_memory_()

    def acquire(self, worker_id: int, count: int) -> int:
        """Slot for the worker's ``count``-th batch, once the main process has copied what was there."""
        while count - int(self.copied[worker_id]) >= self.per_worker:
            time.sleep(0.0002)
        return worker_id * self.per_worker + count % self.per_worker

    def numpy_slot(self, slot: int) -> dict[str, np.ndarray]:
        return {name: tensor[slot].numpy() for name, tensor in self.tensors.items()}

    def take(self, slot: int) -> dict[str, torch.Tensor]:
        batch = {name: tensor[slot].clone() for name, tensor in self.tensors.items()}
        self.copied[slot // self.per_worker] += 1
        return batch


class _PreemptionSafeWorkerInit:
    """Workers ignore SIGTERM, then run the user's ``worker_init_fn``.

    torch.distributed.elastic signals a worker's whole process group on shutdown; a loader worker
    dying of that SIGTERM makes the training process raise "DataLoader worker ... is killed" in the
    middle of its agreed preemption save. Workers still end with their parent (DataLoader's watchdog)
    and with SIGKILL at the end of the grace period.
    """

    def __init__(self, user_init: Callable[[int], None] | None) -> None:
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.user_init is not None:
            self.user_init(worker_id)


class ShardedLoader:
    """A DataLoader over a ShardedDataset that counts batches as the training loop takes them.

    ``state_dict()`` is therefore exact however far workers prefetched. Batches are dealt to workers
    round-robin, so the order is the same for any ``num_workers``. Each wait for a batch is reported
    to ``wait_observer(seconds)``, by default ``trainkit.metrics.observe_data_wait`` when installed.
    Other keyword arguments go to ``torch.utils.data.DataLoader`` (``pin_memory``, ``prefetch_factor``,
    ``multiprocessing_context``, ``timeout``...).
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        *,
        num_workers: int = 0,
        wait_observer: Callable[[float], None] | None = None,
        **dataloader_kwargs: Any,
    ) -> None:
        if not isinstance(dataset, ShardedDataset):
            raise TypeError(f"ShardedLoader needs a ShardedDataset, got {type(dataset).__name__}")
        for key in ("batch_size", "sampler", "batch_sampler", "shuffle", "persistent_workers"):
            if key in dataloader_kwargs:
                raise ValueError(
                    f"ShardedLoader does not take {key}=: batching and order belong to the ShardedDataset "
                    "and workers are started per epoch so they see the current cursor"
                )
        if num_workers < 0:
            raise ValueError(f"num_workers ({num_workers}) must be >= 0")
        self.dataset, self.num_workers = dataset, num_workers
        self.dataloader_kwargs = dataloader_kwargs
        self._observer = wait_observer if wait_observer is not None else _default_wait_observer()

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        dataset = self.dataset
        cursor, start = dataset._begin_iteration()
        ring = None
        if (
            self.num_workers > 0
            and dataset.transform is None
            and not self.dataloader_kwargs.get("pin_memory")
        ):
            in_flight = self.dataloader_kwargs.get("prefetch_factor") or 2
            ring = _SlotRing(dataset._batch_layout(), self.num_workers, in_flight + 2)
        if self.num_workers == 0 and not self.dataloader_kwargs:
            # nothing for a DataLoader to add in-process: skip its per-batch overhead
            iterator = dataset._batches(cursor, start, 0, 1)
        else:
            kwargs = dict(self.dataloader_kwargs)
            if self.num_workers > 0:
                kwargs["worker_init_fn"] = _PreemptionSafeWorkerInit(kwargs.get("worker_init_fn"))
            loader = DataLoader(
                _WorkerView(dataset, cursor, start, ring),
                batch_size=None,
                num_workers=self.num_workers,
                **kwargs,
            )
            iterator = iter(loader)
        observe = self._observer
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if ring is not None:
                batch = ring.take(batch[_SLOT_KEY])
            if observe is not None:
                observe(time.perf_counter() - began)
            if dataset._cursor is not cursor:
                raise ShardsError(
                    "the dataset's cursor changed (set_epoch or load_state_dict) while a ShardedLoader "
                    "iteration was running; start a new iteration after changing it"
                )
            dataset._advance(1)
            cursor = dataset._cursor
            yield batch
        dataset._finished_here = True


def _default_wait_observer() -> Callable[[float], None] | None:
    try:
        from trainkit.metrics import observe_data_wait
    except ImportError:
        return None
    return observe_data_wait
