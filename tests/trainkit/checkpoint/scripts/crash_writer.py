"""Test writer for crash consistency: saves step after step, each step's tensors a function of the step.

    python crash_writer.py ROOT MEGABYTES

Tensor ``k`` at step ``s`` holds the value ``s * 1000 + k`` everywhere; the process prints
"committed <s>" after each save is known to be committed. The test SIGKILLs it at random moments.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from trainkit.checkpoint import CheckpointManager

NUM_TENSORS = 8


def expected_value(step: int, index: int) -> float:
    return float(step * 1000 + index)


def main() -> None:
    root, megabytes = sys.argv[1], float(sys.argv[2])
    numel = int(megabytes * 2**20 / 4 / NUM_TENSORS)
    model = nn.ParameterList(
        [nn.Parameter(torch.empty(numel), requires_grad=False) for _ in range(NUM_TENSORS)]
    )
    ckpt = CheckpointManager(root, keep_last=2, async_save=True, signals=None)
    step = (ckpt.restore({"model": model}) or 0) + 1
    print(f"ready {step}", flush=True)
    while True:
        with torch.no_grad():
            for index, parameter in enumerate(model):
                parameter.fill_(expected_value(step, index))
        ckpt.save(step, {"model": model, "extras": {"step": step}})
        ckpt.wait() if step % 2 else None  # every other save stays in flight while the next is prepared
        print(f"committed {step if step % 2 else step - 1}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
