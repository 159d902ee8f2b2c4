"""Worker using only torch.distributed: all_reduce, then one rank SIGKILLs itself until the last attempt.

Argument: the number of restarts to provoke. Each attempt prints one line per rank; the attempt
numbered that argument finishes normally.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

num_failing_attempts = int(sys.argv[1])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.ones(1)
dist.all_reduce(value)
print(f"rank {rank} attempt {attempt} value {value.item():.0f}", flush=True)
if attempt < num_failing_attempts and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()
dist.destroy_process_group()
