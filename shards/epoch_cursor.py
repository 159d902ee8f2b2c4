"""The epoch cursor the shards datasets share: where this rank stands in an epoch's order of samples
(rows of ``ShardedDataset``, windows of ``TokenWindowDataset``), its part of their ``state_dict``,
and the protocol of one pass over it (begin, advance, finish).

What a sample is, how the epoch orders samples, and which keys identify a dataset in its state stay
in each dataset; this module never reads data. It imports torch; ``shards`` itself does not.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator, Iterator, Mapping
from typing import Any, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from shards.at_exit import close_at_exit
from shards.errors import ShardsError
from shards.options import WorldLike
from shards.plan import Cursor, Split, fresh_cursor, make_split, rebase_cursor

__all__ = ["CursorIteration", "EpochCursorDataset", "cursor_state"]

logger = logging.getLogger("shards")


class _EpochOrder(Protocol):
    epoch: int


def cursor_state(cursor: Cursor) -> dict[str, Any]:
    """The cursor as plain ints, bools and lists: the last keys of a dataset's ``state_dict``."""
    return {
        "epoch": cursor.epoch,
        "intervals": [[a, b] for a, b in cursor.intervals],
        "world_size": cursor.world_size,
        "batch_size": cursor.batch_size,
        "drop_last": cursor.drop_last,
        "consumed": cursor.consumed,
    }


def _cursor_from_state(state: Mapping[str, Any]) -> Cursor:
    cursor = Cursor(
        epoch=int(state["epoch"]),
        intervals=tuple((int(a), int(b)) for a, b in state["intervals"]),
        world_size=int(state["world_size"]),
        batch_size=int(state["batch_size"]),
        drop_last=bool(state["drop_last"]),
        consumed=int(state["consumed"]),
    )
    make_split(cursor)  # validates consumed against the saved split
    return cursor


class EpochCursorDataset(IterableDataset):
    """What ``ShardedDataset`` and ``TokenWindowDataset`` share: this rank's cursor over the epoch's
    ``num_samples`` samples, ``set_epoch``, ``len()``, the drop report, the cursor part of the state,
    and counted direct iteration.

    A subclass sets ``url``, ``world``, ``batch_size`` and ``drop_last``, calls ``_start_cursor``,
    and provides ``_make_order(epoch)``, ``_describe_dropped(n)`` and ``begin_iteration()``.
    """

    url: str
    world: WorldLike
    batch_size: int
    drop_last: bool

    def _start_cursor(self, num_samples: int) -> None:
        self._num_samples = num_samples
        self._cursor = fresh_cursor(
            num_samples, 0, self.world.world_size, self.batch_size, self.drop_last
        )
        self._finished_here = False
        self._reported_epoch = -1
        self._order: Any = None

    def _make_order(self, epoch: int) -> _EpochOrder:
        raise NotImplementedError

    def _describe_dropped(self, num_dropped: int) -> str:
        raise NotImplementedError

    def begin_iteration(self) -> CursorIteration:
        raise NotImplementedError

    # -- epoch -------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    @property
    def cursor(self) -> Cursor:
        """Where this rank stands in the epoch (read-only; ``advance`` of an iteration moves it)."""
        return self._cursor

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``; a no-op when the cursor is already in it (e.g. after a resume)."""
        if epoch != self._cursor.epoch:
            self._restart(epoch)

    def _restart(self, epoch: int) -> None:
        self._cursor = fresh_cursor(
            self._num_samples, epoch, self.world.world_size, self.batch_size, self.drop_last
        )
        self._finished_here = False

    def order(self) -> Any:
        """The epoch's order of samples, made once per epoch."""
        if self._order is None or self._order.epoch != self._cursor.epoch:
            self._order = self._make_order(self._cursor.epoch)
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

    # -- state -------------------------------------------------------------------------------------
    def _check_state(self, state: Mapping[str, Any], expected: Mapping[str, Any], fix: str) -> None:
        """Refuses a state whose identifying keys differ from this dataset's; ``fix`` says how."""
        for key, value in expected.items():
            if state.get(key) != value:
                raise ShardsError(
                    f"dataset {self.url}: the loader state has {key}={state.get(key)!r} but this "
                    f"dataset has {value!r}; {fix}"
                )

    def _resume_cursor(self, state: Mapping[str, Any]) -> None:
        """Continue the saved epoch, its remainder split again over this world."""
        cursor = _cursor_from_state(state)
        self._cursor = rebase_cursor(cursor, self.world.world_size, self.batch_size, self.drop_last)
        self._order = None
        self._finished_here = False

    # -- iteration ---------------------------------------------------------------------------------
    def _begin_pass(self) -> Cursor:
        """The cursor a new pass starts from: an epoch this object already finished starts over; a
        drop is reported once per epoch, on rank 0."""
        split = self.split()
        if self._finished_here and self.consumed_batches >= split.num_batches:
            self._restart(self._cursor.epoch)
            split = self.split()
        if split.num_dropped and self.world.rank == 0 and self._reported_epoch != self.epoch:
            self._reported_epoch = self.epoch
            logger.warning(
                "shards %s epoch %d: %s dropped so that every rank gets %d batches of %d "
                "(drop_last=True; pass drop_last=False to pad instead)",
                self.url,
                self.epoch,
                self._describe_dropped(split.num_dropped),
                split.num_batches,
                self.batch_size,
            )
        return self._cursor

    def __iter__(self) -> Iterator[Any]:
        """Direct iteration counts every yielded batch as consumed (use ``ShardedLoader`` for workers)."""
        return close_at_exit(self._counted_batches())

    def _counted_batches(self) -> Generator[Any, None, None]:
        if get_worker_info() is not None:  # a plain DataLoader cannot count in the main process
            raise ShardsError(
                f"{type(self).__name__} under a plain DataLoader with workers cannot count consumed "
                "batches; wrap it in shards.ShardedLoader(dataset, num_workers=...)"
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


class CursorIteration:
    """One pass over this rank's batches from a snapshot of the dataset's cursor.

    ``batches(worker_id, num_workers)`` (each dataset's) reads the batches a worker produces, in any
    process; ``advance()`` counts one batch the training loop took, in the process that owns the
    dataset; ``finish()`` marks the pass complete, so the next one restarts the epoch.
    """

    def __init__(self, dataset: EpochCursorDataset, cursor: Cursor) -> None:
        self.dataset, self.cursor = dataset, cursor
        self.start_batch = cursor.consumed // cursor.batch_size

    def batches(self, worker_id: int = 0, num_workers: int = 1, into: Any = None) -> Any:
        raise NotImplementedError

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
