"""Token windows: language-model samples of ``block_size + 1`` tokens cut from one token stream when
reading, so the context length is a reading choice, not a property of the written dataset.

The stream is a token column's values, rows and row groups in manifest order. Window ``k`` covers
tokens ``[k * block_size, k * block_size + block_size + 1)``: windows cross row and row-group
boundaries, and every token after the first is a target exactly once per epoch. The epoch order,
its split over ranks and the resume state are ``shards.plan``'s, over window numbers instead of rows.
This module never writes data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from shards.assemble import TensorLayout, add_flags, flags_layout
from shards.epoch_cursor import CursorIteration, EpochCursorDataset, cursor_state
from shards.errors import ManifestError, ShardsError
from shards.manifest import Manifest
from shards.options import ReadOptions, WorldLike, check_world, default_world
from shards.plan import (
    PLAN_CHUNK_BATCHES,
    EpochOrder,
    batches_positions,
    make_split,
    worker_batch_indices,
)
from shards.reader import ProcessReader, RowGroupPrefetcher, ShardReader
from shards.storage import resolve_location

__all__ = [
    "TokenStream",
    "TokenWindowBatch",
    "TokenWindowDataset",
    "TokenWindowIteration",
    "WindowAssembler",
    "token_counts",
]

logger = logging.getLogger("shards")

STATE_VERSION = 1


def _token_type(type_: pa.DataType) -> tuple[pa.DataType, int] | None:
    """The integer type of a token column and the tokens per row (0: variable), or None."""
    per_row = 1
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        per_row, type_ = 0, type_.value_type
    else:
        while pa.types.is_fixed_size_list(type_):
            per_row *= type_.list_size
            type_ = type_.value_type
    return (type_, per_row) if pa.types.is_integer(type_) else None


def token_counts(manifest: Manifest, column: str) -> np.ndarray | None:
    """Tokens in each row group (manifest order) of ``column``; None for a list column whose
    counts the manifest lacks (a dataset written before they were kept: count them by reading)."""
    found = _token_type(manifest.schema.field(column).type)
    assert found is not None, "checked by the caller"
    rg_rows = manifest.table.rg_rows
    if found[1]:
        return rg_rows * found[1]
    return manifest.list_value_counts(column)


@dataclass(frozen=True)
class TokenStream:
    """Where the tokens of each row group start in the stream, and the windows of ``block_size``."""

    token_offsets: np.ndarray  # len(row groups) + 1
    block_size: int

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    @property
    def num_windows(self) -> int:
        """Windows of ``block_size + 1`` tokens at a stride of ``block_size``."""
        return max(0, (self.num_tokens - 1) // self.block_size)

    def windows_per_group(self) -> np.ndarray:
        """Windows whose first token lies in each row group."""
        first = -(-self.token_offsets // self.block_size)  # first window starting at or after
        return np.diff(np.minimum(first, self.num_windows))

    def groups_of(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row groups holding the first and the last token of each window."""
        starts = np.asarray(windows, dtype=np.int64) * self.block_size
        offsets = self.token_offsets
        first = np.searchsorted(offsets, starts, side="right") - 1
        last = np.searchsorted(offsets, starts + self.block_size, side="right") - 1
        return first, last


class _WindowOrder:
    """The epoch order of windows: ``shards.plan.EpochOrder`` over the row groups where windows
    start (their windows as rows), so shuffling mixes distant parts of the stream in blocks and a
    rank reads only the row groups its span touches."""

    def __init__(
        self,
        stream: TokenStream,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        block_windows: int | None,
    ) -> None:
        counts = stream.windows_per_group()
        # row groups where no window starts take no part in the order: global row ids of the
        # remaining ones are then window numbers
        self.epoch = epoch
        self.inner = EpochOrder(
            counts[counts > 0],
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            block_rows=block_windows,
        )

    @property
    def block_windows(self) -> int:
        return self.inner.block_rows

    def windows(self, positions: np.ndarray) -> np.ndarray:
        return self.inner.global_rows(positions)


@dataclass(frozen=True)
class TokenWindowBatch:
    """One planned batch: its window numbers, which are padding, and the row groups it reads."""

    windows: np.ndarray
    padding: np.ndarray
    first_groups: np.ndarray
    row_groups: tuple[int, ...]


@dataclass(frozen=True)
class WindowAssembler:
    """Copies each window's tokens out of the loaded row groups into a ``[batch, block + 1]`` array.

    One array rather than inputs and targets: ``x, y = w[:, :-1], w[:, 1:]`` are views, so workers
    copy and share half the bytes that two arrays would cost.
    """

    column: str
    batch_size: int
    stream: TokenStream
    dtype: np.dtype
    with_index: bool
    pad_flags: bool
    transform: None = None  # ShardedLoader's protocol: batches are tensors, slots can be shared

    def layout(self) -> TensorLayout:
        length = self.stream.block_size + 1
        layout: TensorLayout = {
            self.column: (
                (self.batch_size, length),
                torch.from_numpy(np.empty(0, self.dtype)).dtype,
            )
        }
        layout.update(
            flags_layout(self.batch_size, with_index=self.with_index, pad_flags=self.pad_flags)
        )
        return layout

    def assemble(
        self,
        planned: TokenWindowBatch,
        loaded: Mapping[int, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, torch.Tensor]:
        length = self.stream.block_size + 1
        offsets = self.stream.token_offsets
        if outputs is not None:
            out = outputs[self.column]
        else:
            out = np.empty((len(planned.windows), length), dtype=self.dtype)
        starts = planned.windows * self.stream.block_size
        groups = planned.first_groups
        local = (starts - offsets[groups]).tolist()
        inside = (starts + length <= offsets[groups + 1]).tolist()
        for index, (start, group) in enumerate(zip(starts.tolist(), groups.tolist(), strict=True)):
            if inside[index]:  # the common case: one copy from one row group
                out[index] = loaded[group][local[index] : local[index] + length]
                continue
            filled = 0
            while filled < length:
                position = start + filled
                while position >= offsets[group + 1]:  # the window went past this row group
                    group += 1
                tokens = loaded[group]
                begin = position - int(offsets[group])
                take = min(length - filled, len(tokens) - begin)
                out[index, filled : filled + take] = tokens[begin : begin + take]
                filled += take
        result = {self.column: torch.from_numpy(out)}
        add_flags(
            result,
            index=planned.windows.copy() if self.with_index else None,
            padding=planned.padding.copy() if self.pad_flags else None,
            outputs=outputs,
        )
        return result


class TokenWindowDataset(EpochCursorDataset):
    """This rank's batches of token windows from the token ``column`` of the dataset at ``url``.

    Each batch is ``{column: [batch_size, block_size + 1]}`` in the column's integer type; train
    on ``w[:, :-1]`` to predict ``w[:, 1:]``. ``column`` holds integers, lists of integers (one
    document per row, any lengths) or fixed-size lists of them; its values concatenated in manifest
    order are the stream, and the same written dataset serves any ``block_size``.

    Windows are ``shards.ShardedDataset``'s samples: each is delivered once per epoch across ranks
    and workers, every rank gets ``len()`` batches (the remainder is dropped and reported, or with
    ``drop_last=False`` padded with repeats flagged in ``_padding``), ``state_dict()`` resumes at any
    world size, and ``shards.ShardedLoader`` runs it with workers. ``shuffle`` (default True) orders
    windows in blocks of about ``block_windows`` (default ~1% of the windows, at most 65,536) mixed
    from random parts of the stream. ``with_index`` adds window numbers as ``_index``. ``world``,
    ``read_options`` and the I/O keywords are those of ``ShardedDataset``.
    """

    def __init__(
        self,
        url: str,
        *,
        column: str,
        block_size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        world: WorldLike | None = None,
        block_windows: int | None = None,
        with_index: bool = False,
        read_options: ReadOptions | None = None,
        **read_keywords: Any,
    ) -> None:
        super().__init__()
        if block_size <= 0 or batch_size <= 0:
            raise ValueError(
                f"block_size ({block_size}) and batch_size ({batch_size}) must be positive"
            )
        self.read_options = ReadOptions.with_overrides(read_options, read_keywords)
        self.url, self.column = str(url), column
        self.location = resolve_location(self.url, self.read_options.storage_options)
        self.manifest = Manifest.load_from(self.location)
        schema = self.manifest.schema
        if column not in schema.names:
            raise ShardsError(
                f"dataset {self.url}: no column {column!r}; the dataset has {schema.names}"
            )
        found = _token_type(schema.field(column).type)
        if found is None:
            raise ShardsError(
                f"dataset {self.url}: column {column!r} has type {schema.field(column).type}; token "
                "windows need integers, lists of integers or fixed-size lists of integers"
            )
        self.dtype = np.dtype(found[0].to_pandas_dtype())
        self.world = check_world(world if world is not None else default_world())
        self.block_size, self.batch_size = block_size, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.block_windows, self.with_index = block_windows, with_index
        self._readers = ProcessReader(self.manifest, self.location, [column], self.read_options)
        counts = token_counts(self.manifest, column)
        if counts is None:
            counts = self._count_tokens()
        self.stream = TokenStream(np.concatenate([[0], np.cumsum(counts)]), block_size)
        windows = self.stream.num_windows
        share = windows // self.world.world_size
        if drop_last and share < batch_size:
            raise ShardsError(
                f"dataset {self.url}: {self.stream.num_tokens} tokens make {windows} windows of "
                f"{block_size} + 1; a rank's share ({share} with {self.world.world_size} ranks) is "
                f"smaller than batch_size {batch_size}; lower batch_size or block_size, use fewer "
                "ranks, or pass drop_last=False to pad"
            )
        if windows == 0:
            raise ShardsError(
                f"dataset {self.url}: {self.stream.num_tokens} tokens make no window of "
                f"{block_size} + 1; lower block_size"
            )
        self._start_cursor(windows)
        self.reader_stats: dict[str, int] = {}

    def _count_tokens(self) -> np.ndarray:
        """Reads every row group of the column once: datasets written before the manifest kept
        list value counts (rewrite with ``shards write`` to skip this)."""
        logger.warning(
            "shards %s: the manifest has no token counts for column %r; reading all of it once to "
            "count them (rewrite the dataset with this version of `shards write` to skip this)",
            self.url,
            self.column,
        )
        reader = self._process_reader()
        return np.asarray(
            [
                len(reader.load(group).column(self.column).flatten())
                for group in range(self.manifest.num_row_groups)
            ],
            dtype=np.int64,
        )

    # -- epoch order and state ---------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.stream.num_tokens

    @property
    def num_windows(self) -> int:
        return self.stream.num_windows

    def _make_order(self, epoch: int) -> _WindowOrder:
        return _WindowOrder(
            self.stream,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            block_windows=self.block_windows,
        )

    def _describe_dropped(self, num_dropped: int) -> str:
        return f"{num_dropped} window(s) of {self.block_size + 1} tokens"

    def _state_identity(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "token_windows",
            "num_tokens": self.num_tokens,
            "block_size": self.block_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, bools and lists: the epoch cursor over windows, the same on every rank."""
        return {
            **self._state_identity(),
            "block_windows": self.order().block_windows,
            **cursor_state(self._cursor),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()`` of any rank of any world size: the rest of that epoch follows."""
        self._check_state(
            state,
            self._state_identity(),
            "resume with the same dataset, column, block_size, seed and shuffle setting (a new "
            "block_size starts a new epoch: call set_epoch)",
        )
        if self.block_windows is None:
            self.block_windows = int(state["block_windows"])
        elif state["block_windows"] != self.block_windows:
            raise ShardsError(
                f"dataset {self.url}: the loader state has block_windows={state['block_windows']} "
                f"but this dataset has {self.block_windows}; resume with the same block_windows"
            )
        self._resume_cursor(state)

    # -- iteration ---------------------------------------------------------------------------------
    def begin_iteration(self) -> TokenWindowIteration:
        """A pass over the batches left in this epoch; restarts an epoch this object already finished."""
        return TokenWindowIteration(self, self._begin_pass())

    def assembler(self) -> WindowAssembler:
        return WindowAssembler(
            column=self.column,
            batch_size=self.batch_size,
            stream=self.stream,
            dtype=self.dtype,
            with_index=self.with_index,
            pad_flags=not self.drop_last,
        )

    def _process_reader(self) -> ShardReader:
        return self._readers.get()


class TokenWindowIteration(CursorIteration):
    """One pass over this rank's window batches from a snapshot of the dataset's cursor: the same
    protocol as ``shards.dataset.EpochIteration`` (``batches``, ``advance``, ``finish``)."""

    dataset: TokenWindowDataset

    def plan(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[TokenWindowBatch]:
        """The batches worker ``worker_id`` produces, in its order (located a chunk at a time)."""
        dataset = self.dataset
        split, order, stream = make_split(self.cursor), dataset.order(), dataset.stream
        assert order.epoch == self.cursor.epoch
        counts = np.diff(stream.token_offsets)
        size = split.cursor.batch_size
        indices = worker_batch_indices(split.num_batches, self.start_batch, worker_id, num_workers)
        for first in range(0, len(indices), PLAN_CHUNK_BATCHES):
            chunk = indices[first : first + PLAN_CHUNK_BATCHES]
            positions, padding = batches_positions(split, dataset.world.rank, chunk)
            windows = order.windows(positions)
            first_groups, last_groups = stream.groups_of(windows)
            for index in range(len(chunk)):
                part = slice(index * size, (index + 1) * size)
                lo, hi = first_groups[part], last_groups[part]
                needed = set(lo.tolist())
                for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
                    if b > a:  # a window that crosses into later row groups
                        needed.update(range(a + 1, b + 1))
                # row groups without tokens hold no data
                groups = tuple(g for g in sorted(needed) if counts[g])
                yield TokenWindowBatch(windows[part], padding[part], lo, groups)

    def batches(
        self,
        worker_id: int = 0,
        num_workers: int = 1,
        into: Callable[[int], Mapping[str, np.ndarray]] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start_batch + worker_id``, then every ``num_workers``-th, of this rank; with
        ``into``, the ``n``-th is written into the arrays ``into(n)`` returns."""
        dataset = self.dataset
        assembler, reader = dataset.assembler(), dataset._process_reader()
        options = dataset.read_options
        bytes_per_token = max(1, dataset.manifest.num_bytes // max(1, dataset.num_tokens))
        batch_bytes = dataset.batch_size * (dataset.block_size + 1) * bytes_per_token
        prefetcher = RowGroupPrefetcher(
            self._loader_of(reader),
            reader.rg_bytes,
            budget_bytes=options.readahead_bytes,
            num_threads=options.readahead_threads,
            lookahead_items=max(2, options.readahead_bytes // batch_bytes),
        )
        before = reader.bytes_read
        try:
            items = ((batch, batch.row_groups) for batch in self.plan(worker_id, num_workers))
            for count, (batch, loaded) in enumerate(prefetcher.run(items)):
                yield assembler.assemble(batch, loaded, into(count) if into else None)
        finally:
            dataset.reader_stats = {
                "bytes_read": reader.bytes_read - before,
                "peak_readahead_bytes": prefetcher.peak_bytes,
            }

    def _loader_of(self, reader: ShardReader) -> Callable[[int], np.ndarray]:
        """Loads a row group's tokens as one flat numpy array (zero-copy where Arrow allows)."""
        dataset = self.dataset
        counts = np.diff(dataset.stream.token_offsets)

        def load_tokens(group: int) -> np.ndarray:
            values = reader.load(group).column(dataset.column)
            while not pa.types.is_integer(values.type):
                values = values.flatten()
            if values.null_count:
                raise ShardsError(
                    f"dataset {dataset.url}: column {dataset.column!r} has {values.null_count} "
                    f"null token(s) in row group {group}; fill them when writing"
                )
            if len(values) != counts[group]:
                raise ManifestError(
                    f"dataset {dataset.url}: row group {group} holds {len(values)} tokens of "
                    f"{dataset.column!r}, the manifest counts {counts[group]}; the manifest was "
                    "edited or corrupted - rewrite the dataset with `shards write`"
                )
            return values.to_numpy(zero_copy_only=True)

        return load_tokens
