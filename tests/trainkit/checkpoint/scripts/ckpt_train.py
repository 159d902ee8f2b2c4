"""Test worker: DDP training that checkpoints, resumes, and logs every sample id it consumes.

    trainkit-run --standalone --nproc-per-node 2 ckpt_train.py --root R --out O --steps 40
    python -m torch.distributed.run --standalone --nproc-per-node 4 ckpt_train.py --mode reshard-save ...

Rank 0 writes the final parameters to <out>/final.pt; every rank appends "<step> <ids>" lines to
<out>/samples-rank<r>.txt and writes its current step to <out>/progress-rank<r>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainkit
from trainkit.checkpoint import CheckpointManager, exit_preempted


class PermutationLoader:
    """A resumable per-rank sampler: a seeded permutation per epoch and a cursor into it."""

    def __init__(self, rank: int, num_samples: int = 97, batch_size: int = 4) -> None:
        self.rank, self.num_samples, self.batch_size = rank, num_samples, batch_size
        self.epoch, self.position = 0, 0

    def next_ids(self) -> list[int]:
        order = torch.randperm(
            self.num_samples, generator=torch.Generator().manual_seed(1000 * self.epoch + self.rank)
        )
        if self.position + self.batch_size > self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
            return self.next_ids()
        ids = order[self.position : self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return ids

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def load_rank_state_dicts(self, states: list[dict[str, int]]) -> None:
        # Reshard hook: the test records what it was given.
        self.merged = states


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument(
        "--mode", default="train", choices=["train", "reshard-save", "reshard-load"]
    )
    args = parser.parse_args()
    world = trainkit.init()
    torch.manual_seed(0)
    inputs_table = torch.randn(97, 16)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, 4))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = PermutationLoader(world.rank)
    torch.manual_seed(100 + world.rank)  # per-rank RNG stream (dropout, noise): must resume exactly
    state = {"model": model, "optim": optimizer, "loader": loader, "extras": {"note": "x"}}
    ckpt = CheckpointManager(args.root, interval_steps=args.interval, keep_last=2)
    start = ckpt.restore(state) or 0
    args.out.mkdir(parents=True, exist_ok=True)

    if args.mode == "reshard-load":
        result = {
            "restored": start,
            "params": {k: v.clone() for k, v in model.module.state_dict().items()},
            "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
            "merged": getattr(loader, "merged", None),
        }
        torch.save(result, args.out / f"reshard-load-rank{world.rank}.pt")
        ckpt.close()
        trainkit.shutdown()
        return

    samples = open(args.out / f"samples-rank{world.rank}.txt", "a")  # noqa: SIM115
    for step in range(start + 1, args.steps + 1):
        ids = loader.next_ids()
        batch = inputs_table[ids] + 0.01 * torch.randn(len(ids), 16)
        loss = model(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        samples.write(f"{step} {' '.join(map(str, ids))}\n")
        samples.flush()
        (args.out / f"progress-rank{world.rank}").write_text(str(step))
        if args.mode == "reshard-save" and step == args.steps:
            ckpt.save(step, state, block=True)
            if world.is_main:
                torch.save(
                    {
                        "params": {k: v.clone() for k, v in model.module.state_dict().items()},
                        "momentum": [
                            optimizer.state[p]["momentum_buffer"].clone()
                            for p in model.parameters()
                        ],
                    },
                    args.out / "reshard-expected.pt",
                )
            break
        ckpt.maybe_save(step, state)
        if ckpt.should_stop:
            samples.close()
            ckpt.close()
            trainkit.shutdown()
            exit_preempted()
        time.sleep(args.step_sleep_s)
    samples.close()
    ckpt.close()
    if world.is_main and args.mode == "train":
        torch.save(
            {k: v.clone() for k, v in model.module.state_dict().items()}, args.out / "final.pt"
        )
    trainkit.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
