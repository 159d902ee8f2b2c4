"""Functions that test_ray_api.py launches through ``launchers.ray.run`` (loaded with runpy, so
Ray pickles them by value). Each runs in its own training process with torchrun's environment."""

from __future__ import annotations

import os
import time
from pathlib import Path


def allreduce_ranks(scale: float, *, offset: float = 0.0) -> dict[str, object]:
    """Join the world, sum (rank + 1) * scale + offset over all ranks, return what this rank saw."""
    import torch
    import torch.distributed as dist

    import trainkit

    world = trainkit.init()
    value = torch.tensor([(world.rank + 1) * scale + offset])
    dist.all_reduce(value)
    trainkit.shutdown()
    return {"world": world.as_dict(), "sum": value.item(), "pid": os.getpid()}


def record_steps_until_released(outdir: str, num_steps: int, samples_per_step: int) -> int:
    """Record steps into the node's /metrics, then wait (up to 300 s) for <outdir>/release."""
    import trainkit
    import trainkit.metrics

    world = trainkit.init()
    for _ in range(num_steps):
        trainkit.metrics.step(samples=samples_per_step)
    release = Path(outdir) / "release"
    deadline = time.monotonic() + 300
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    trainkit.shutdown()
    return world.rank
