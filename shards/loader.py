"""``ShardedLoader``: a DataLoader over a ``ShardedDataset`` that counts batches as the training loop
takes them, so its state is exact however far workers prefetched.

Workers write batches into shared slots and send only slot numbers; they never outlive an iteration:
when it ends - finished, abandoned, failed, or still alive when the interpreter exits - the slots
close and the workers are shut down.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.assemble import TensorLayout
from shards.at_exit import close_at_exit
from shards.dataset import EpochIteration, ShardedDataset

__all__ = ["ShardedLoader"]

_SLOT_KEY = "_shards_slot"


class ShardedLoader:
    """A DataLoader over a ShardedDataset that counts batches as the training loop takes them.

    ``state_dict()`` is therefore exact however far workers prefetched. A loop that fetches the next
    batch before it trains on the current one (nanoGPT's ``X, Y = get_batch()`` during the forward
    pass) passes ``prefetch_ahead=True``: a batch then counts when the loop asks for the next one,
    so a checkpoint leaves out the batch it holds but has not trained on. Default: counted when
    taken, right for ``for batch in loader``. ``iter(loader)`` is the rest of the current epoch;
    ``batches()`` spans epochs without end. Batches are dealt to workers round-robin, so the order is
    the same for any ``num_workers``. Each wait for a batch is reported to
    ``wait_observer(seconds)`` when given (e.g. ``trainkit.metrics.observe_data_wait``). Other
    keyword arguments go to ``torch.utils.data.DataLoader`` (``pin_memory``, ``prefetch_factor``,
    ``multiprocessing_context``, ``timeout``...).
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        *,
        num_workers: int = 0,
        prefetch_ahead: bool = False,
        wait_observer: Callable[[float], None] | None = None,
        **dataloader_kwargs: Any,
    ) -> None:
        if not hasattr(dataset, "begin_iteration"):  # ShardedDataset, TokenWindowDataset
            raise TypeError(
                f"ShardedLoader needs a ShardedDataset or TokenWindowDataset, got {type(dataset).__name__}"
            )
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
        self.prefetch_ahead = prefetch_ahead
        self.wait_observer = wait_observer

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        """The batches left in the current epoch (all of it, or the rest after a resume)."""
        return close_at_exit(self._epoch_batches())

    def batches(self) -> Iterator[Any]:
        """Batches without end, epoch after epoch: the one-call loop of step-based training.

        It starts where the state stands: after a resume it finishes the saved epoch first, and an
        epoch whose batches were all consumed moves on to the next. ``state_dict()`` stays exact
        across epoch boundaries.
        """
        while True:
            if self.dataset.consumed_batches >= len(self.dataset):
                self.set_epoch(self.dataset.epoch + 1)
            yield from self

    def _epoch_batches(self) -> Generator[Any, None, None]:
        iteration = self.dataset.begin_iteration()
        if self.num_workers == 0 and not self.dataloader_kwargs:
            # nothing for a DataLoader to add in-process: skip its per-batch overhead
            batches = iteration.batches()
            try:
                yield from self._counted(iteration, batches, ring=None)
                iteration.finish()
            finally:
                batches.close()  # its readahead threads stop now, not at interpreter shutdown
            return
        ring = None
        assembler = self.dataset.assembler()
        pinned = bool(self.dataloader_kwargs.get("pin_memory"))
        if self.num_workers > 0 and assembler.transform is None and not pinned:
            in_flight = self.dataloader_kwargs.get("prefetch_factor") or 2
            ring = _SlotRing(assembler.layout(), self.num_workers, in_flight + 2)
        kwargs = dict(self.dataloader_kwargs)
        ended = torch.zeros(1, dtype=torch.bool)
        if self.num_workers > 0:
            ended.share_memory_()
            kwargs["worker_init_fn"] = _PreemptionSafeWorkerInit(
                kwargs.get("worker_init_fn"), ended
            )
        loader = DataLoader(
            _WorkerView(iteration, ring), batch_size=None, num_workers=self.num_workers, **kwargs
        )
        batches = iter(loader)
        try:
            yield from self._counted(iteration, batches, ring)
            iteration.finish()
        finally:
            # workers may wait for a slot the loop will never free, and they ignore SIGTERM while
            # the iteration lives: mark it ended, then shut them down now. DataLoader does it only
            # when its iterator is collected, which a raised exception's traceback delays to
            # interpreter exit, where multiprocessing would join workers that never stop (a private
            # method, absent for in-process iterators, hence getattr)
            ended[0] = True
            if ring is not None:
                ring.close()
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _counted(
        self, iteration: EpochIteration, batches: Iterator[Any], ring: _SlotRing | None
    ) -> Iterator[Any]:
        """Each batch as the training loop takes it, its wait reported, counted when taken or, with
        ``prefetch_ahead``, when the loop asks for the next one."""
        observe, ahead = self.wait_observer, self.prefetch_ahead
        while True:
            began = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            if ring is not None:
                batch = ring.take(batch[_SLOT_KEY])
            if observe is not None:
                observe(time.perf_counter() - began)
            if not ahead:
                iteration.advance()
            yield batch
            if ahead:  # the loop came back for the next batch: it has used this one
                iteration.advance()


class _WorkerView(IterableDataset):
    """What DataLoader workers iterate: their share of one epoch iteration, never counted there."""

    def __init__(self, iteration: EpochIteration, ring: _SlotRing | None) -> None:
        super().__init__()
        self.iteration, self.ring = iteration, ring

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        ring = self.ring
        if ring is None:
            yield from self.iteration.batches(worker_id, num_workers)
            return
        slots: list[int] = []

        def into(count: int) -> dict[str, np.ndarray]:
            slots.append(ring.acquire(worker_id, count))
            return ring.numpy_slot(slots[-1])

        try:
            for _ in self.iteration.batches(worker_id, num_workers, into=into):
                yield {_SLOT_KEY: slots.pop()}
        except _IterationEnded:
            return  # nobody takes these batches any more


class _IterationEnded(RuntimeError):
    """The iteration a worker produces for ended; the worker stops producing."""


class _SlotRing:
    """Batch-sized shared-memory slots, ``per_worker`` for each worker, allocated once per iteration.

    Workers write batches into their own slots and send only the slot number; the main process
    copies a slot out and counts it, and a worker reuses a slot only after that copy. This replaces
    a fresh shared-memory segment per batch, which costs more than the batch's bytes.
    """

    def __init__(self, layout: TensorLayout, num_workers: int, per_worker: int) -> None:
        self.per_worker = per_worker
        total = num_workers * per_worker
        self.tensors = {
            name: torch.empty((total, *shape), dtype=dtype).share_memory_()
            for name, (shape, dtype) in layout.items()
        }
        self.copied = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        self.closed = torch.zeros(1, dtype=torch.bool).share_memory_()
        self.owner_pid = os.getpid()

    def acquire(self, worker_id: int, count: int) -> int:
        """Slot for the worker's ``count``-th batch, once the main process has copied what was there.

        Raises ``_IterationEnded`` once the iteration ended or its process is gone, so a worker
        never waits for a slot that will not be freed.
        """
        while count - int(self.copied[worker_id]) >= self.per_worker:
            if bool(self.closed[0]) or os.getppid() != self.owner_pid:
                raise _IterationEnded("the ShardedLoader iteration this worker fed has ended")
            time.sleep(0.0002)
        return worker_id * self.per_worker + count % self.per_worker

    def numpy_slot(self, slot: int) -> dict[str, np.ndarray]:
        return {name: tensor[slot].numpy() for name, tensor in self.tensors.items()}

    def take(self, slot: int) -> dict[str, torch.Tensor]:
        batch = {name: tensor[slot].clone() for name, tensor in self.tensors.items()}
        self.copied[slot // self.per_worker] += 1
        return batch

    def close(self) -> None:
        self.closed[0] = True


class _PreemptionSafeWorkerInit:
    """Workers ignore SIGTERM while their iteration lives, then run the user's ``worker_init_fn``.

    torch.distributed.elastic signals a worker's whole process group on shutdown; a loader worker
    dying of that SIGTERM makes the training process raise "DataLoader worker ... is killed" in the
    middle of its agreed preemption save. Once the iteration ended (``ended`` set by the loader),
    SIGTERM kills again, so the SIGTERM with which DataLoader and multiprocessing end a worker that
    did not stop in time still works. Workers also end with their parent (DataLoader's watchdog)
    and with SIGKILL at the end of the grace period.
    """

    def __init__(self, user_init: Callable[[int], None] | None, ended: torch.Tensor) -> None:
        self.user_init, self.ended = user_init, ended

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # reads in progress resume instead of failing with EINTR, as they did while it was ignored
        signal.siginterrupt(signal.SIGTERM, False)
        if self.user_init is not None:
            self.user_init(worker_id)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if bool(self.ended[0]):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
