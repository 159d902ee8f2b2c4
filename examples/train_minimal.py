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

Data and checkpoints may live on S3 (credentials and endpoint from the usual AWS_* variables):
``--data s3://bucket/minimal --checkpoint-dir s3://bucket/ckpt``. ``--sample-log DIR`` writes, per
rank and process, one JSON line per step with the sample ids it trained on, and one per restore
and save with a digest of the weights: the elastic story (benchmarks/recovery.py) checks from
them that every sample of every epoch was trained on exactly once across failures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import fsspec
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
        "--sample-log", default="", help="directory for per-step sample-id logs; empty: none"
    )
    parser.add_argument(
        "--collective-timeout-s",
        type=float,
        default=600,
        help="seconds a collective may hang (a peer cut off) before this rank fails",
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
            "id": pa.array(range(rows), pa.int64()),  # sample ids, for exactly-once accounting
            "x": pa.FixedSizeListArray.from_arrays(pa.array(inputs.numpy().ravel()), features),
            "y": pa.FixedSizeListArray.from_arrays(pa.array(labels.numpy().ravel()), 4),
        }
    )
    write_shards(table, url, bytes_per_shard=2 << 20, row_group_bytes=256 << 10, progress=False)


class SampleLog:
    """One JSON line per event of this rank's process; flushed each line, so a kill loses at most one."""

    def __init__(self, directory: str, world: trainkit.World) -> None:
        os.makedirs(directory, exist_ok=True)
        name = f"rank{world.rank}-{os.uname().nodename}-{os.getpid()}.jsonl"
        self._file = open(os.path.join(directory, name), "a")  # noqa: SIM115 - open for the run
        self._base = {
            "rank": world.rank,
            "world_size": world.world_size,
            "round": f"{world.master_addr}:{world.master_port}",  # a fresh store every round
        }

    def write(self, event: str, **fields: object) -> None:
        line = {"event": event, "t": time.time(), **self._base, **fields}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the weights, to compare what a restore loaded with what was saved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    started_unix_s = time.time()
    args = parse_args()
    # reads trainkit-run / torchrun / Kubeflow / Ray environments
    world = trainkit.init(timeout=timedelta(seconds=args.collective_timeout_s))
    log = SampleLog(args.sample_log, world) if args.sample_log else None
    if log is not None:
        log.write("start", started=started_unix_s)
    data_url = args.data or os.path.join(
        tempfile.gettempdir(), f"trainkit-minimal-v2-{args.rows}x{args.features}-seed{args.seed}"
    )
    fs, manifest_path = fsspec.core.url_to_fs(data_url.rstrip("/") + "/manifest.json")
    if world.is_main and not fs.exists(manifest_path):
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
        restore_started = time.time()
        start = checkpoints.restore(state) or 0  # newest committed step; None on a fresh start
        if log is not None:
            digest = weights_digest(model.module)
            log.write("restored", step=start, digest=digest, began=restore_started)

    if world.is_main:
        print(
            f"training on {world.world_size} process(es), world from {world.source!r}, "
            f"{len(loader)} batches per rank per epoch, from step {start + 1}",
            flush=True,
        )
    batches = loader.batches()  # across epochs; after a resume it finishes the saved epoch first
    started = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        batch = next(batches)
        epoch = dataset.epoch  # the epoch this batch belongs to
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        trainkit.metrics.step(samples=len(batch["x"]))  # ~1 us; served by trainkit-run's /metrics
        if log is not None:  # before the save: a saved step is always in the log
            log.write("step", step=step, epoch=epoch, ids=batch["id"].tolist())
        if step % args.log_every == 0 or step == start + 1:
            reduced = loss.detach().clone()
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.AVG)
            if world.is_main:
                print(f"step {step:5d}  loss {reduced.item():.4f}", flush=True)
        if checkpoints is not None:
            state = {"model": model, "optimizer": optimizer, "loader": loader}
            if checkpoints.maybe_save(step, state) and log is not None and world.is_main:
                log.write("saved", step=step, digest=weights_digest(model.module))
            if checkpoints.should_stop:  # SIGTERM: this step is saved on every rank
                exit_preempted()  # close, leave the group, exit 75 (the Job's podFailurePolicy retries)
    if checkpoints is not None:
        checkpoints.close()
    if world.is_main:
        elapsed = time.perf_counter() - started
        samples = (args.steps - start) * args.batch_size * world.world_size
        print(f"done: {args.steps - start} steps, {samples / elapsed:,.0f} samples/s", flush=True)
    trainkit.shutdown()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        # A failed collective (a peer lost) leaves work queued on the process group, and the
        # interpreter's teardown would wait on it: exit now so trainkit-run restarts the world.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
