"""Test worker for trainkit-ray: DDP from Arrow shards with committed checkpoints, logging every id.

    trainkit-ray --num-workers 2 ray_train.py --data D --root R --out O --steps 30
    trainkit-run --standalone --nproc-per-node 2 ray_train.py ...      # the same script, as reference

Every rank writes "<step> <ids>" lines to <out>/samples-rank<r>.txt (lines past the restored step
are dropped on resume, so the file is what the final model was trained on) and its step to
<out>/progress-rank<r>, its process id to <out>/pid-rank<r>; rank 0 writes the final parameters to
<out>/final.pt. ``--fail-at N`` makes
rank 1 exit 3 at step N in the first attempt only (TORCHELASTIC_RESTART_COUNT=0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainkit
import trainkit.metrics
from shards import ShardedDataset, ShardedLoader
from trainkit.checkpoint import CheckpointManager, exit_preempted


def keep_steps_up_to(path: Path, last_step: int) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if int(line.split()[0]) <= last_step]
    path.write_text("".join(f"{line}\n" for line in kept))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument("--fail-at", type=int, default=0)
    args = parser.parse_args()

    world = trainkit.init()
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = ShardedLoader(
        ShardedDataset(args.data, batch_size=8, seed=5, world=world), num_workers=0
    )
    torch.manual_seed(100 + world.rank)  # per-rank RNG stream (dropout): must resume exactly
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    checkpoints = CheckpointManager(args.root, interval_steps=args.interval, keep_last=2)
    start = checkpoints.restore(state) or 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pid-rank{world.rank}").write_text(str(os.getpid()))  # for kill tests
    samples_path = args.out / f"samples-rank{world.rank}.txt"
    keep_steps_up_to(samples_path, start)

    batches = iter(loader)
    with samples_path.open("a") as samples:
        for step in range(start + 1, args.steps + 1):
            batch = next(batches)
            prediction = model(batch["x"])
            loss = (prediction.squeeze(1) - batch["y"]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trainkit.metrics.step(samples=len(batch["id"]))
            samples.write(f"{step} {' '.join(map(str, batch['id'].tolist()))}\n")
            samples.flush()
            (args.out / f"progress-rank{world.rank}").write_text(str(step))
            restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            if step == args.fail_at and world.rank == 1 and restart == 0:
                os._exit(3)  # a crash: no clean-up, no checkpoint of this step
            checkpoints.maybe_save(step, state)
            if checkpoints.should_stop:
                checkpoints.close()
                trainkit.shutdown()
                exit_preempted()
            time.sleep(args.step_sleep_s)
    checkpoints.close()
    if world.is_main:
        torch.save(
            {k: v.clone() for k, v in model.module.state_dict().items()}, args.out / "final.pt"
        )
    trainkit.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
