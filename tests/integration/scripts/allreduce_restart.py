"""Worker: join through trainkit.init(), all-reduce; rank 1 dies mid-run on the first attempt."""

import os
import sys

import torch
import torch.distributed as dist

import trainkit

world = trainkit.init()
value = torch.ones(1)
for step in range(10):
    dist.all_reduce(value)
    if world.restart_count == 0 and world.rank == 1 and step == 5:
        os._exit(3)
print(f"rank {world.rank} attempt {world.restart_count} value {value.item():.0f}", flush=True)
trainkit.shutdown()
sys.exit(0)
