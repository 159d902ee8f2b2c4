"""Every rank of a world run in this one process, one after another: the exactly-once tests of both
shards datasets compare what each rank's ``ShardedLoader`` delivered and the state it saved."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from shards import ShardedLoader

__all__ = ["run_every_rank"]


def run_every_rank(
    make_dataset: Callable[[int], Any],
    world_size: int,
    *,
    key: str,
    num_workers: int = 0,
    stop: int | None = None,
    states: Sequence[Mapping[str, Any]] | None = None,
    check: Callable[[Any, Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """For each rank, ``make_dataset(rank)`` (resumed from ``states[rank % len(states)]`` when
    given) read through a ``ShardedLoader`` for ``stop`` batches or the rest of the epoch, with
    ``check(dataset, batch)`` called on each batch. Returns the samples' ``batch[key]`` values per
    rank (padding left out) and each loader's state at the end."""
    seen, saved = [], []
    for rank in range(world_size):
        ds = make_dataset(rank)
        if states is not None:
            ds.load_state_dict(states[rank % len(states)])
        loader = ShardedLoader(ds, num_workers=num_workers)
        values = []
        for batch in loader:
            if check is not None:
                check(ds, batch)
            values.append(batch[key][~batch["_padding"]] if "_padding" in batch else batch[key])
            if len(values) == stop:
                break  # the loop took this batch: it counts as consumed
        saved.append(loader.state_dict())
        seen.append(torch.cat(values).numpy() if values else np.zeros(0, np.int64))
    return seen, saved
