"""``ShardedDataset``: this rank's batches of a shards dataset as dicts of tensors, exactly once per
epoch across ranks and workers, resumable at any world size from a small state.

The dataset owns the epoch cursor; an ``EpochIteration`` reads from a snapshot of it and counts what
the training loop consumed. This module imports torch; ``shards`` itself does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from shards.assemble import INDEX_KEY, PADDING_KEY, BatchAssembler
from shards.epoch_cursor import CursorIteration, EpochCursorDataset, cursor_state
from shards.errors import ShardsError
from shards.manifest import Manifest
from shards.options import ReadOptions, WorldLike, check_world, default_world
from shards.plan import (
    EpochOrder,
    make_split,
    plan_worker_batches,
)
from shards.reader import (
    ProcessReader,
    RowGroupPrefetcher,
    ShardReader,
    column_to_numpy,
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

STATE_VERSION = 1


class ShardedDataset(EpochCursorDataset):
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
        self._start_cursor(num_rows)
        self._readers = ProcessReader(self.manifest, self.location, self.columns, self.read_options)
        self.reader_stats: dict[str, int] = {}

    # -- epoch order and state ---------------------------------------------------------------------
    def _make_order(self, epoch: int) -> EpochOrder:
        rg_rows, _, _ = self.manifest.row_group_table()
        return EpochOrder(
            rg_rows, seed=self.seed, epoch=epoch, shuffle=self.shuffle, block_rows=self.block_rows
        )

    def _describe_dropped(self, num_dropped: int) -> str:
        return f"{num_dropped} sample(s)"

    def _state_identity(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "num_rows": self.manifest.num_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, bools and lists: the epoch cursor, identical on every rank in lock-step training."""
        return {
            **self._state_identity(),
            "block_rows": self.order().block_rows,
            **cursor_state(self._cursor),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()`` of any rank of any world size: the rest of that epoch follows."""
        self._check_state(
            state,
            self._state_identity(),
            "resume with the same dataset, seed and shuffle setting",
        )
        if state["block_rows"] != self.order().block_rows and self.block_rows is None:
            self.block_rows = int(state["block_rows"])
        elif state["block_rows"] != self.order().block_rows:
            raise ShardsError(
                f"dataset {self.url}: the loader state has block_rows={state['block_rows']} but this dataset "
                f"has {self.block_rows}; resume with the same block_rows"
            )
        self._resume_cursor(state)

    # -- iteration ---------------------------------------------------------------------------------
    def begin_iteration(self) -> EpochIteration:
        """A pass over the batches left in this epoch; restarts an epoch this object already finished."""
        return EpochIteration(self, self._begin_pass())

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
        return self._readers.get()


class EpochIteration(CursorIteration):
    """One pass over this rank's batches from a snapshot of the dataset's cursor.

    ``batches(worker_id, num_workers)`` reads the batches a worker produces (in any process: the
    object is picklable); ``advance()`` counts one batch the training loop took, in the process that
    owns the dataset; ``finish()`` marks the pass complete, so the next one restarts the epoch.
    """

    dataset: ShardedDataset

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


def __getattr__(name: str) -> Any:
    # ShardedLoader lived here before it got its own module
    if name == "ShardedLoader":
        from shards.loader import ShardedLoader

        return ShardedLoader
    raise AttributeError(f"module 'shards.dataset' has no attribute {name!r}")
