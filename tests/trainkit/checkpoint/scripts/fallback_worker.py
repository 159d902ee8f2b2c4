"""Test worker: save steps 10 and 20, flip one byte of step 20's data file, restore.

    torchrun --standalone --nproc-per-node 2 fallback_worker.py ROOT OUT

Each rank writes "<restored step>" to OUT/restored-rank<r>; with a process group, DCP gathers the
read error across ranks, which must not stop restore from falling back to step 10.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import trainkit
from trainkit.checkpoint import CheckpointManager


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    world = trainkit.init()
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    with CheckpointManager(root, signals=None, async_save=False) as ckpt:
        ckpt.save(10, {"model": model})
        expected = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(20, {"model": model})
    dist.barrier()
    if world.is_main:
        data = root / "step_0000000020" / "__0_0.distcp"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    dist.barrier()
    fresh = nn.Linear(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = CheckpointManager(root, signals=None).restore({"model": fresh})
    same = bool(torch.equal(fresh.weight.detach(), expected))
    (out / f"restored-rank{world.rank}").write_text(f"{restored} {same}")
    trainkit.shutdown()


if __name__ == "__main__":
    main()
