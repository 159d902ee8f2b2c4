"""Train a small MLP with DDP from Arrow shards, with optional preemption-safe checkpoints.

    make train                                                     # set-up + this job, 2 processes
    trainkit-run --standalone --nproc-per-node 2 examples/train_minimal.py
    trainkit-run --standalone --nproc-per-node 2 examples/train_minimal.py --steps 400 --lr 0.05
    python examples/train_minimal.py                               # a world of one, no launcher

The data is a synthetic regression set (a fixed random linear map plus noise) written once as
Parquet shards; every rank streams its own exactly-once share of each epoch through
``shards.ShardedLoader``, so the loss falls towards the noise floor (~0.01) within a few hundred
steps on CPU.

Preemption and resume: with ``--checkpoint-dir``, SIGTERM (what the kubelet sends before SIGKILL)
makes every rank save the same step and exit 75 (``trainkit.checkpoint.EXIT_PREEMPTED``); the next
start resumes there exactly, model, optimizer, RNG and data position included:

    TRAINKIT_GRACE_PERIOD_S=25 trainkit-run --standalone --nproc-per-node 2 \\
        examples/train_minimal.py --steps 3000 --checkpoint-dir /tmp/tk-ckpt &
    sleep 20; kill -TERM $!; wait $!; echo "exit $?"     # exit 75: preempted, checkpoint committed
    trainkit ckpt list /tmp/tk-ckpt
    trainkit-run --standalone --nproc-per-node 2 examples/train_minimal.py --steps 3000 --checkpoint-dir /tmp/tk-ckpt
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator

import pyarrow as pa
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainkit
import trainkit.metrics
from shards import ShardedDataset, ShardedLoader, write_shards
from trainkit.checkpoint import CheckpointManager, exit_preempted


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per rank")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    parser.add_argument(
        "--features", type=int, default=32, help="input width of the synthetic data"
    )
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the model, the data and its order"
    )
    parser.add_argument("--rows", type=int, default=65_536, help="rows in the synthetic dataset")
    parser.add_argument(
        "--data", default="", help="shard directory or URL (default: a temp dir, written once)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="DataLoader worker processes per rank"
    )
    parser.add_argument(
        "--checkpoint-dir", default="", help="checkpoint root (path or s3://...); empty: none"
    )
    parser.add_argument(
        "--save-every", type=int, default=50, help="save a checkpoint every N steps"
    )
    parser.add_argument(
        "--memory-every",
        type=int,
        default=0,
        help="also snapshot into pod memory (/dev/shm, replicated to a peer pod) every N steps; 0: off",
    )
    return parser.parse_args()


def write_synthetic_shards(url: str, *, rows: int, features: int, seed: int) -> None:
    """inputs ~ N(0, 1); labels = inputs @ target + 0.1 noise, as fixed-size-list float32 columns."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(features, 4, generator=generator) / features**0.5
    inputs = torch.randn(rows, features, generator=generator)
    labels = inputs @ target + 0.1 * torch.randn(rows, 4, generator=generator)
    table = pa.table(
        {
            "x": pa.FixedSizeListArray.from_arrays(pa.array(inputs.numpy().ravel()), features),
            "y": pa.FixedSizeListArray.from_arrays(pa.array(labels.numpy().ravel()), 4),
        }
    )
    write_shards(table, url, bytes_per_shard=2 << 20, row_group_bytes=256 << 10, progress=False)


def endless(loader: ShardedLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches across epochs; after a resume it finishes the saved epoch first."""
    epoch = loader.state_dict()["epoch"]
    while True:
        loader.set_epoch(epoch)  # a no-op while the cursor is still inside this epoch
        yield from loader
        epoch += 1


def main() -> None:
    args = parse_args()
    world = trainkit.init()  # reads trainkit-run / torchrun / Kubeflow / Ray environments
    data_url = args.data or os.path.join(
        tempfile.gettempdir(), f"trainkit-minimal-{args.rows}x{args.features}-seed{args.seed}"
    )
    if world.is_main and not os.path.exists(os.path.join(data_url, "manifest.json")):
        write_synthetic_shards(data_url, rows=args.rows, features=args.features, seed=args.seed)
    torch.distributed.barrier()  # the manifest is written last: now every rank can read it

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 4))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    dataset = ShardedDataset(data_url, batch_size=args.batch_size, seed=args.seed, world=world)
    # each wait for a batch feeds trainkit's data-wait metric (shards itself knows nothing of metrics)
    loader = ShardedLoader(
        dataset, num_workers=args.workers, wait_observer=trainkit.metrics.observe_data_wait
    )

    checkpoints = None
    start = 0
    if args.checkpoint_dir:
        checkpoints = CheckpointManager(
            args.checkpoint_dir,
            interval_steps=args.save_every,
            memory_interval_steps=args.memory_every or None,
        )
        state = {"model": model, "optimizer": optimizer, "loader": loader}
        start = checkpoints.restore(state) or 0  # newest committed step; None on a fresh start

    if world.is_main:
        print(
            f"training on {world.world_size} process(es), world from {world.source!r}, "
            f"{len(loader)} batches per rank per epoch, from step {start + 1}",
            flush=True,
        )
    batches = endless(loader)
    started = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        batch = next(batches)
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        trainkit.metrics.step(samples=len(batch["x"]))  # ~1 us; served by trainkit-run's /metrics
        if step % args.log_every == 0 or step == start + 1:
            reduced = loss.detach().clone()
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.AVG)
            if world.is_main:
                print(f"step {step:5d}  loss {reduced.item():.4f}", flush=True)
        if checkpoints is not None:
            checkpoints.maybe_save(step, {"model": model, "optimizer": optimizer, "loader": loader})
            if checkpoints.should_stop:  # SIGTERM: this step is saved on every rank
                checkpoints.close()
                trainkit.shutdown()
                exit_preempted()  # exit 75, which the Job's podFailurePolicy treats as retriable
    if checkpoints is not None:
        checkpoints.close()
    if world.is_main:
        elapsed = time.perf_counter() - started
        samples = (args.steps - start) * args.batch_size * world.world_size
        print(f"done: {args.steps - start} steps, {samples / elapsed:,.0f} samples/s", flush=True)
    trainkit.shutdown()


if __name__ == "__main__":
    main()
