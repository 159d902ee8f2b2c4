"""nanoGPT's train.py, converted to trainkit: the lines marked ``# trainkit`` are the whole change.

    python examples/nanogpt_style/prepare.py /tmp/tk-nanogpt-data
    trainkit-run --standalone --nproc-per-node 2 examples/nanogpt_style/train.py \\
        --data /tmp/tk-nanogpt-data --out-dir /tmp/tk-nanogpt-out
    trainkit ckpt export /tmp/tk-nanogpt-out --to torch --model-only --out /tmp/model.pt
    python examples/nanogpt_style/sample.py /tmp/model.pt --meta /tmp/tk-nanogpt-data/meta.json

Like nanoGPT it is a module-level loop that fetches the next batch during the forward pass. What
trainkit brings: the world from any launcher (`trainkit.init`), token windows of any block size read
exactly once per epoch across ranks and workers (`TokenWindowDataset`), checkpoints that resume
bit-exactly, data position included (`CheckpointManager`), and SIGTERM answered by one agreed save on
every rank and exit 75 (`exit_preempted`). Run it again with the same ``--out-dir`` to resume.
"""

from __future__ import annotations

import argparse
import math

import torch
from model import GPT, GPTConfig
from torch.nn.parallel import DistributedDataParallel

import trainkit  # trainkit
from shards import ShardedLoader, TokenWindowDataset  # trainkit
from trainkit.checkpoint import CheckpointManager, TrainState, exit_preempted  # trainkit

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True, help="token shards written by prepare.py")
parser.add_argument("--out-dir", required=True, help="checkpoint root (path or s3://...)")
parser.add_argument("--max-iters", type=int, default=300)
parser.add_argument("--batch-size", type=int, default=16, help="windows per rank per iteration")
parser.add_argument("--learning-rate", type=float, default=3e-3)
parser.add_argument("--warmup-iters", type=int, default=20)
parser.add_argument("--save-every", type=int, default=50)
parser.add_argument("--log-every", type=int, default=25)
parser.add_argument("--loss-log", default="", help="append 'iter loss' lines of rank 0 here")
args = parser.parse_args()

world = trainkit.init()  # trainkit: replaces init_process_group and the RANK/LOCAL_RANK reads
device = world.device  # trainkit: cuda:<local rank> on GPUs, else cpu
config = GPTConfig()
torch.manual_seed(1337)
model = GPT(config).to(device)
if world.world_size > 1:
    model = DistributedDataParallel(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)

# trainkit: get_batch's random memmap offsets become exactly-once windows of block_size + 1 tokens
dataset = TokenWindowDataset(  # trainkit
    args.data, column="tokens", block_size=config.block_size, batch_size=args.batch_size
)
loader = ShardedLoader(dataset, num_workers=1, prefetch_ahead=True)  # trainkit
batches = loader.batches()  # trainkit: every epoch in turn, resuming inside the saved one
train = TrainState(iter_num=0, best_loss=math.inf)  # trainkit: the loop's scalars, checkpointed
checkpoints = CheckpointManager(args.out_dir, interval_steps=args.save_every)  # trainkit
state = {"model": model, "optimizer": optimizer, "loader": loader, "train": train}  # trainkit
checkpoints.restore(state)  # trainkit: the newest committed step, if any


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    windows = next(batches)["tokens"].long()  # trainkit: [batch, block_size + 1]
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def learning_rate(iteration: int) -> float:
    """Linear warm-up, then cosine decay to a tenth, as nanoGPT's get_lr."""
    if iteration < args.warmup_iters:
        return args.learning_rate * (iteration + 1) / args.warmup_iters
    progress = (iteration - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


if world.is_main:
    print(f"{world.world_size} process(es), from iteration {train.iter_num}", flush=True)
X, Y = get_batch()  # fetched before the loop, as nanoGPT does
while train.iter_num < args.max_iters:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(train.iter_num)
    _, loss = model(X, Y)
    X, Y = get_batch()  # the next batch, fetched while this one is in flight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    train.iter_num += 1
    if args.loss_log and world.is_main:  # for the resume test: every loss, exactly
        with open(args.loss_log, "a") as log:
            log.write(f"{train.iter_num} {loss.item()!r}\n")
    if train.iter_num % args.log_every == 0 and world.is_main:
        train.best_loss = min(train.best_loss, loss.item())
        print(f"iter {train.iter_num}: loss {loss.item():.4f}", flush=True)
    checkpoints.maybe_save(train.iter_num, state)  # trainkit: every save_every, and on SIGTERM
    if checkpoints.should_stop:  # trainkit: SIGTERM; this iteration is saved on every rank
        exit_preempted()  # trainkit: wait for the save, leave the group, exit 75

checkpoints.close()  # trainkit
trainkit.shutdown()  # trainkit
