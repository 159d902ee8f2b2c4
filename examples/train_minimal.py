"""Train a small MLP with DDP on synthetic data: the README's main job.

    make train                                                     # set-up + this job, 2 processes
    trainkit-run --standalone --nproc-per-node 2 examples/train_minimal.py
    trainkit-run --standalone --nproc-per-node 2 examples/train_minimal.py --steps 400 --lr 0.05
    python examples/train_minimal.py                               # a world of one, no launcher

The target is a fixed random linear map plus noise, so the loss falls towards the noise floor
(~0.01) within a few hundred steps on CPU. Every rank draws its own batches from a seeded generator.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainkit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per rank")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--features", type=int, default=32, help="input width of the synthetic data")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the target map")
    return parser.parse_args()


def synthetic_batch(generator: torch.Generator, target: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ~ N(0, 1); labels = inputs @ target + 0.1 noise."""
    inputs = torch.randn(batch_size, target.shape[0], generator=generator)
    labels = inputs @ target + 0.1 * torch.randn(batch_size, target.shape[1], generator=generator)
    return inputs, labels


def main() -> None:
    args = parse_args()
    world = trainkit.init()  # reads trainkit-run / torchrun / Kubeflow / Ray environments
    torch.manual_seed(args.seed)  # same initial weights and target on every rank
    target = torch.randn(args.features, 4) / args.features**0.5
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 4))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    data = torch.Generator().manual_seed(args.seed * 1000 + world.rank + 1)  # different batches per rank

    if world.is_main:
        print(f"training on {world.world_size} process(es), world from {world.source!r}", flush=True)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, labels = synthetic_batch(data, target, args.batch_size)
        loss = nn.functional.mse_loss(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        if step % args.log_every == 0 or step == 1:
            reduced = loss.detach().clone()
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.AVG)
            if world.is_main:
                print(f"step {step:5d}  loss {reduced.item():.4f}", flush=True)
    if world.is_main:
        elapsed = time.perf_counter() - started
        samples = args.steps * args.batch_size * world.world_size
        print(f"done: {args.steps} steps, {samples / elapsed:,.0f} samples/s", flush=True)
    trainkit.shutdown()


if __name__ == "__main__":
    main()
