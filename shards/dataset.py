"""``ShardedDataset``: this rank's batches of a shards dataset as dicts of tensors, exactly once per
epoch across ranks and workers, resumable at any world size from a small state.

The dataset owns the epoch cursor; an ``EpochIteration`` reads from a snapshot of it and counts what
the training loop consumed. This module imports torch; ``shards`` itself does not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset, get_worker_info

from shards.assemble import INDEX_KEY, PADDING_KEY, BatchAssembler
from shards.at_exit import close_at_exit
from shards.cache import ShardCache
from shards.errors import ShardsError
from shards.manifest import Manifest
from shards.options import ReadOptions, WorldLike, check_world, default_world
from shards.plan import (
    Cursor,
    EpochOrder,
    Split,
    fresh_cursor,
    make_split,
    plan_worker_batches,
    rebase_cursor,
)
from shards.reader import (
    RowGroupPrefetcher,
    ShardReader,
    column_to_numpy,
    default_marks_dir,
    tensor_column_error,
)
from shards.storage import resolve_location

__all__ = [
    "INDEX_KEY",
    "PADDING_KEY",
    "EpochIteration",
    "ShardedDataset",
    "default_world",
]

logger = logging.getLogger("shards")

STATE_VERSION = 1


class ShardedDataset(IterableDataset):
    """This rank's batches (dicts of tensors) of the dataset at ``url`` (any fsspec URL).

    Every rank gets the same number of batches (``len()``); each sample of an epoch is delivered once
    across ranks and workers. The remainder that cannot fill a batch on every rank is dropped and
    reported (``num_dropped``), or with ``drop_last=False`` filled with repeated samples flagged in
    ``batch["_padding"]``. Defaults: ``shuffle=True`` (row groups permuted, rows permuted within
    blocks of ``block_rows``, default ~1% of the dataset), ``seed=0``, all columns, ``world`` (any
    object with ``rank`` and ``world_size``, e.g. ``trainkit.World``) from the environment.
    ``transform`` receives each batch as a pyarrow RecordBatch and returns what to yield, for
    columns tensors cannot hold; with ``drop_last=False`` or ``with_index=True`` it must return a
    dict (any mutable mapping), to which ``_padding`` / ``_index`` are added.

    How files are read - cache, readahead, checksum checks, open-file bound, fsspec options - is a
    ``ReadOptions`` (``read_options=``); its fields are also accepted as keywords (``cache_dir=``,
    ``cache_bytes=``, ``storage_options=``, ``readahead_bytes=``...), which override it.
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
        world: WorldLike | None = None,
        block_rows: int | None = None,
        transform: Callable[[pa.RecordBatch], Any] | None = None,
        with_index: bool = False,
        read_options: ReadOptions | None = None,
        **read_keywords: Any,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) must be positive")
        self.read_options = ReadOptions.with_overrides(read_options, read_keywords)
        self.url = str(url)
        self.location = resolve_location(self.url, self.read_options.storage_options)
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
        self.world = check_world(world if world is not None else default_world())
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.block_rows = drop_last, block_rows
        self.transform, self.with_index = transform, with_index
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
        self._reader: tuple[int, ShardReader] | None = None
        self.reader_stats: dict[str, int] = {}

    # -- epoch and state ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    @property
    def cursor(self) -> Cursor:
        """Where this rank stands in the epoch (read-only; ``EpochIteration.advance`` moves it)."""
        return self._cursor

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
            rg_rows, _, _ = self.manifest.row_group_table()
            self._order = EpochOrder(
                rg_rows,
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

    # -- iteration ---------------------------------------------------------------------------------
    def begin_iteration(self) -> EpochIteration:
        """A pass over the batches left in this epoch; restarts an epoch this object already finished."""
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
        return EpochIteration(self, self._cursor)

    def __iter__(self) -> Iterator[Any]:
        """Direct iteration counts every yielded batch as consumed (use ``ShardedLoader`` for workers)."""
        return close_at_exit(self._counted_batches())

    def _counted_batches(self) -> Generator[Any, None, None]:
        if get_worker_info() is not None:  # a plain DataLoader cannot count in the main process
            raise ShardsError(
                "ShardedDataset under a plain DataLoader with workers cannot count consumed batches; "
                "wrap it in shards.ShardedLoader(dataset, num_workers=...)"
            )
        iteration = self.begin_iteration()
        batches = iteration.batches()
        try:
            for batch in batches:
                iteration.advance()
                yield batch
            iteration.finish()
        finally:
            batches.close()  # its readahead threads stop now, not at interpreter shutdown

    def assembler(self) -> BatchAssembler:
        """What turns loaded row groups into this dataset's batches (and their tensor layout)."""
        return BatchAssembler(
            schema=self.manifest.schema,
            columns=self.columns,
            batch_size=self.batch_size,
            rg_offsets=self.order().rg_offsets,
            with_index=self.with_index,
            pad_flags=not self.drop_last,
            transform=self.transform,
        )

    def _process_reader(self) -> ShardReader:
        """One reader per process, kept across epochs: shards are opened and checked once."""
        if self._reader is not None and self._reader[0] == os.getpid():
            return self._reader[1]
        options = self.read_options
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
        # open memory maps and locks stay in their process
        return {**self.__dict__, "_reader": None}


class EpochIteration:
    """One pass over this rank's batches from a snapshot of the dataset's cursor.

    ``batches(worker_id, num_workers)`` reads the batches a worker produces (in any process: the
    object is picklable); ``advance()`` counts one batch the training loop took, in the process that
    owns the dataset; ``finish()`` marks the pass complete, so the next one restarts the epoch.
    """

    def __init__(self, dataset: ShardedDataset, cursor: Cursor) -> None:
        self.dataset, self.cursor = dataset, cursor
        self.start_batch = cursor.consumed // cursor.batch_size

    def batches(
        self,
        worker_id: int = 0,
        num_workers: int = 1,
        into: Callable[[int], Mapping[str, np.ndarray]] | None = None,
    ) -> Iterator[Any]:
        """Batches ``start_batch + worker_id``, then every ``num_workers``-th, of this rank.

        With ``into``, the ``n``-th batch is written into the arrays ``into(n)`` returns (shared
        slots laid out as ``dataset.assembler().layout()``) instead of fresh ones.
        """
        dataset = self.dataset
        split, order, assembler = make_split(self.cursor), dataset.order(), dataset.assembler()
        assert order.epoch == self.cursor.epoch
        reader = dataset._process_reader()
        planned = plan_worker_batches(
            split, order, dataset.world.rank, self.start_batch, worker_id, num_workers
        )
        options = dataset.read_options
        row_bytes = max(1, dataset.manifest.num_bytes // max(1, dataset.manifest.num_rows))
        prefetcher = RowGroupPrefetcher(
            self._loader_of(reader),
            reader.rg_bytes,
            budget_bytes=options.readahead_bytes,
            num_threads=options.readahead_threads,
            lookahead_items=max(2, options.readahead_bytes // (dataset.batch_size * row_bytes)),
        )
        cache = reader.cache
        before = (reader.bytes_read, *((cache.hits, cache.misses) if cache else (0, 0)))
        try:
            items = ((batch, batch.row_groups) for batch in planned)
            for count, (batch, loaded) in enumerate(prefetcher.run(items)):
                yield assembler.assemble(batch, loaded, into(count) if into else None)
        finally:
            dataset.reader_stats = {
                "bytes_read": reader.bytes_read - before[0],
                "peak_readahead_bytes": prefetcher.peak_bytes,
                "cache_hits": (cache.hits - before[1]) if cache else 0,
                "cache_misses": (cache.misses - before[2]) if cache else 0,
            }

    def _loader_of(self, reader: ShardReader) -> Callable[[int], Any]:
        """Loads a row group as the assembler wants it: numpy columns, or Arrow for a transform."""
        dataset = self.dataset
        if dataset.transform is not None:
            return reader.load
        where, columns = f"dataset {dataset.url}", dataset.columns

        def load_arrays(group: int) -> dict[str, np.ndarray]:
            batch = reader.load(group)
            return {name: column_to_numpy(batch.column(name), name, where) for name in columns}

        return load_arrays

    def advance(self) -> None:
        """Count one batch as consumed by the training loop; refuses if the cursor moved meanwhile."""
        dataset = self.dataset
        if dataset._cursor is not self.cursor:
            raise ShardsError(
                "the dataset's cursor changed (set_epoch or load_state_dict) while an iteration over "
                "it was running; start a new iteration after changing it"
            )
        cursor = self.cursor
        self.cursor = dataset._cursor = dataclasses.replace(
            cursor, consumed=cursor.consumed + cursor.batch_size
        )

    def finish(self) -> None:
        """The pass delivered all its batches: the next iteration starts the epoch over."""
        if self.dataset._cursor is self.cursor:
            self.dataset._finished_here = True


def __getattr__(name: str) -> Any:
    # ShardedLoader lived here before it got its own module
    if name == "ShardedLoader":
        from shards.loader import ShardedLoader

        return ShardedLoader
    raise AttributeError(f"module 'shards.dataset' has no attribute {name!r}")
