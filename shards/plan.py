"""Epoch planning as pure functions of (row groups, seed, epoch, world size, rank, workers, cursor).

The epoch's global order is fixed first and never depends on the world: a seeded permutation of row
groups, cut into blocks of about ``block_rows`` rows at row-group boundaries, rows permuted inside
each block. A split gives every rank a contiguous, equal-length span of what remains of that order
(whole batches; the remainder is dropped and reported, or padded and flagged). The cursor - what
remains at the last split plus how many samples each rank consumed since - is all a resume needs,
for any new world size. Nothing here reads files or touches torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PLAN_CHUNK_BATCHES",
    "Cursor",
    "EpochOrder",
    "PlannedBatch",
    "Split",
    "auto_block_rows",
    "batch_positions",
    "batches_positions",
    "fresh_cursor",
    "make_split",
    "plan_worker_batches",
    "positions_of_offsets",
    "rebase_cursor",
    "remaining_intervals",
    "worker_batch_indices",
]

Interval = tuple[int, int]
PLAN_CHUNK_BATCHES = 32  # batches located per vectorised step


def auto_block_rows(rg_rows: Sequence[int]) -> int:
    """Default shuffle block: ~1% of the dataset (so edge blocks shared by ranks cost <10% extra reads
    at 8 ranks), at least the largest row group, at most 65,536 rows."""
    rows = np.asarray(rg_rows, dtype=np.int64)
    return int(max(int(rows.max()), min(1 << 16, int(rows.sum()) // 100)))


class EpochOrder:
    """The global sample order of one epoch: position ``p`` in ``[0, num_rows)`` -> (row group, row).

    ``rg_rows`` are the rows of each row group in manifest order; global row ids number rows in that
    order. Without ``shuffle`` the order is the manifest order.
    """

    def __init__(
        self,
        rg_rows: Sequence[int],
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        block_rows: int | None = None,
    ) -> None:
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed ({seed}) and epoch ({epoch}) must be non-negative")
        self.rg_rows = np.asarray(rg_rows, dtype=np.int64)
        self.rg_offsets = np.concatenate([[0], np.cumsum(self.rg_rows)])
        self.num_rows = int(self.rg_offsets[-1])
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.block_rows = block_rows if block_rows is not None else auto_block_rows(self.rg_rows)
        if self.block_rows <= 0:
            raise ValueError(f"block_rows ({self.block_rows}) must be positive")
        num_groups = len(self.rg_rows)
        if shuffle:
            self.rg_order = np.random.default_rng([seed, epoch, 0]).permutation(num_groups)
            first_groups, filled = [0], 0
            for index, rows in enumerate(self.rg_rows[self.rg_order]):
                filled += int(rows)
                if filled >= self.block_rows and index + 1 < num_groups:
                    first_groups.append(index + 1)
                    filled = 0
            first_groups.append(num_groups)
        else:
            self.rg_order = np.arange(num_groups)
            first_groups = list(range(num_groups + 1))  # a block per row group, no permutation
        self.block_first_group = np.asarray(first_groups, dtype=np.int64)
        ordered_cum = np.concatenate([[0], np.cumsum(self.rg_rows[self.rg_order])])
        self.block_starts = ordered_cum[self.block_first_group]
        self._blocks: OrderedDict[int, tuple[np.ndarray | None, np.ndarray, np.ndarray]] = (
            OrderedDict()
        )

    @property
    def num_blocks(self) -> int:
        return len(self.block_first_group) - 1

    def _block(self, block: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """A block's row permutation (None unshuffled), row groups, and their cumulative rows."""
        entry = self._blocks.get(block)
        if entry is None:
            members = self.rg_order[
                self.block_first_group[block] : self.block_first_group[block + 1]
            ]
            cum = np.concatenate([[0], np.cumsum(self.rg_rows[members])])
            perm = None
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, 1, block]).permutation(
                    int(cum[-1])
                )
            entry = self._blocks[block] = (perm, members, cum)
            if len(self._blocks) > 16:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block)
        return entry

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row group ids and rows within them for ``positions`` of this epoch's order."""
        positions = np.asarray(positions, dtype=np.int64)
        blocks = np.searchsorted(self.block_starts, positions, side="right") - 1
        first, last = int(blocks.min()), int(blocks.max())
        if first == last:  # the common case: a batch inside one block
            return self._locate_in_block(first, positions)
        groups = np.empty_like(positions)
        rows = np.empty_like(positions)
        for block in range(first, last + 1):
            mask = blocks == block
            if mask.any():
                groups[mask], rows[mask] = self._locate_in_block(block, positions[mask])
        return groups, rows

    def _locate_in_block(self, block: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        perm, members, cum = self._block(block)
        local = positions - self.block_starts[block]
        if perm is not None:
            local = perm[local]
        index = np.searchsorted(cum, local, side="right") - 1
        return members[index], local - cum[index]

    def global_rows(self, positions: np.ndarray) -> np.ndarray:
        """Global row ids (manifest order) of ``positions``."""
        groups, rows = self.locate(positions)
        return self.rg_offsets[groups] + rows


@dataclass(frozen=True)
class Cursor:
    """Where an epoch stands: order positions that remained at the last split, the split's world and
    batch size, and samples each rank consumed since (equal on every rank in lock-step training)."""

    epoch: int
    intervals: tuple[Interval, ...]
    world_size: int
    batch_size: int
    drop_last: bool
    consumed: int = 0


@dataclass(frozen=True)
class Split:
    """Equal spans of the cursor's remaining samples for each rank."""

    cursor: Cursor
    num_real: int  # samples left at the split
    span: int  # samples per rank, whole batches, padding included
    num_batches: int  # batches per rank
    num_dropped: int  # remainder not delivered this epoch (drop_last)
    num_padded: int  # repeated samples added in total (not drop_last), flagged
    cum_lengths: np.ndarray = field(
        repr=False, compare=False, default_factory=lambda: np.zeros(1, np.int64)
    )


def fresh_cursor(
    num_rows: int, epoch: int, world_size: int, batch_size: int, drop_last: bool
) -> Cursor:
    return Cursor(epoch, ((0, num_rows),), world_size, batch_size, drop_last, 0)


def make_split(cursor: Cursor) -> Split:
    world, batch = cursor.world_size, cursor.batch_size
    if world <= 0 or batch <= 0:
        raise ValueError(f"world_size ({world}) and batch_size ({batch}) must be positive")
    lengths = np.asarray([b - a for a, b in cursor.intervals], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(lengths)])
    real = int(cum[-1])
    per_rank_batches = real // (world * batch) if cursor.drop_last else -(-real // (world * batch))
    span = per_rank_batches * batch
    dropped = real - world * span if cursor.drop_last else 0
    padded = world * span - real if not cursor.drop_last else 0
    if not 0 <= cursor.consumed <= span or cursor.consumed % batch:
        raise ValueError(
            f"cursor consumed {cursor.consumed} samples per rank, which is not a whole number of "
            f"batches of {batch} within the span of {span}; the state does not belong to this split"
        )
    return Split(cursor, real, span, per_rank_batches, dropped, padded, cum)


def positions_of_offsets(split: Split, offsets: np.ndarray) -> np.ndarray:
    """Order positions of offsets into the concatenation of the cursor's intervals."""
    starts = np.asarray([a for a, _ in split.cursor.intervals], dtype=np.int64)
    index = np.searchsorted(split.cum_lengths, offsets, side="right") - 1
    return starts[index] + offsets - split.cum_lengths[index]


def batch_positions(split: Split, rank: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Order positions of ``rank``'s batch number ``batch`` and a flag for padded (repeated) samples."""
    if not 0 <= rank < split.cursor.world_size:
        raise ValueError(f"rank {rank} is outside the world of {split.cursor.world_size}")
    size = split.cursor.batch_size
    virtual = rank * split.span + batch * size + np.arange(size, dtype=np.int64)
    padding = virtual >= split.num_real
    offsets = np.where(padding, virtual % max(split.num_real, 1), virtual)
    return positions_of_offsets(split, offsets), padding


def batches_positions(
    split: Split, rank: int, batches: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_positions`` of several batches at once, concatenated in the order given."""
    if not 0 <= rank < split.cursor.world_size:
        raise ValueError(f"rank {rank} is outside the world of {split.cursor.world_size}")
    size = split.cursor.batch_size
    starts = rank * split.span + np.asarray(batches, dtype=np.int64) * size
    virtual = (starts[:, None] + np.arange(size, dtype=np.int64)).ravel()
    padding = virtual >= split.num_real
    offsets = np.where(padding, virtual % max(split.num_real, 1), virtual)
    return positions_of_offsets(split, offsets), padding


def _slice_intervals(split: Split, start: int, stop: int) -> list[Interval]:
    """Order intervals covering offsets [start, stop) of the concatenated remaining intervals."""
    out: list[Interval] = []
    cum = split.cum_lengths
    for index, (a, _) in enumerate(split.cursor.intervals):
        lo, hi = max(start, int(cum[index])), min(stop, int(cum[index + 1]))
        if lo < hi:
            out.append((a + lo - int(cum[index]), a + hi - int(cum[index])))
    return out


def remaining_intervals(cursor: Cursor) -> tuple[Interval, ...]:
    """Order positions not yet delivered: every rank's span after ``consumed``, then the dropped tail."""
    split = make_split(cursor)
    pieces: list[Interval] = []
    for rank in range(cursor.world_size):
        start = rank * split.span + cursor.consumed
        stop = min((rank + 1) * split.span, split.num_real)
        if start < stop:
            pieces.extend(_slice_intervals(split, start, stop))
    if cursor.world_size * split.span < split.num_real:
        pieces.extend(_slice_intervals(split, cursor.world_size * split.span, split.num_real))
    merged: list[Interval] = []
    for a, b in pieces:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


def rebase_cursor(cursor: Cursor, world_size: int, batch_size: int, drop_last: bool) -> Cursor:
    """The cursor for a (possibly different) world: unchanged when nothing changed, so the same world
    resumes in the same order; otherwise what remains, cut afresh."""
    if (cursor.world_size, cursor.batch_size, cursor.drop_last) == (
        world_size,
        batch_size,
        drop_last,
    ):
        return cursor
    return Cursor(cursor.epoch, remaining_intervals(cursor), world_size, batch_size, drop_last, 0)


def worker_batch_indices(
    num_batches: int, start_batch: int, worker_id: int, num_workers: int
) -> range:
    """Batches a DataLoader worker produces: dealt round-robin from ``start_batch``, which is the
    order DataLoader collects them in, so the rank's order never depends on ``num_workers``."""
    step = max(1, num_workers)
    return range(start_batch + worker_id, num_batches, step)


@dataclass(frozen=True)
class PlannedBatch:
    """Where one batch's samples live: row group and row of each sample (grouped by row group, rows
    in file order), which samples are padding, and the distinct row groups it needs."""

    groups: np.ndarray
    rows: np.ndarray
    padding: np.ndarray
    row_groups: tuple[int, ...]


def plan_worker_batches(
    split: Split,
    order: EpochOrder,
    rank: int,
    start_batch: int,
    worker_id: int,
    num_workers: int,
    chunk_batches: int = PLAN_CHUNK_BATCHES,
) -> Iterator[PlannedBatch]:
    """The batches worker ``worker_id`` of ``rank`` produces from ``start_batch`` on, in its order.

    Within a batch each row group's rows come together and in file order - one gather per row group;
    the order of samples inside a batch carries no meaning. Located ``chunk_batches`` at a time.
    """
    if order.epoch != split.cursor.epoch:
        raise ValueError(f"the order is of epoch {order.epoch}, the split of {split.cursor.epoch}")
    size = split.cursor.batch_size
    indices = worker_batch_indices(split.num_batches, start_batch, worker_id, num_workers)
    for first in range(0, len(indices), chunk_batches):
        chunk = indices[first : first + chunk_batches]
        positions, padding = batches_positions(split, rank, chunk)
        groups, rows = order.locate(positions)
        batch_ids = np.repeat(np.arange(len(chunk)), size)
        key = np.lexsort((rows, groups, batch_ids))
        groups, rows, padding = groups[key], rows[key], padding[key]
        for j in range(len(chunk)):
            part = slice(j * size, (j + 1) * size)
            batch_groups = groups[part]
            distinct = batch_groups[np.concatenate(([True], batch_groups[1:] != batch_groups[:-1]))]
            yield PlannedBatch(batch_groups, rows[part], padding[part], tuple(distinct.tolist()))
