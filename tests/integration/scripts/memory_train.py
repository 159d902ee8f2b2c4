"""A training worker for the memory-tier tests: data-parallel steps on a deterministic stream, a
``CheckpointManager`` with memory snapshots, and JSON lines saying what it saved and restored.

Environment: OUT_DIR (records), STORAGE_URL (+ S3_ENDPOINT for s3://), HIDDEN (model width),
MAX_STEPS, MEMORY_EVERY, STORAGE_EVERY, KILL_RANK/KILL_STEP (SIGKILL itself there on the first
attempt), STOP_FILE (all ranks stop at the first step after it appears), STEP_SLEEP_S.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import zlib
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainkit.checkpoint import CheckpointManager
from trainkit.world import World

BATCH = 4


class Position:
    """The data position: samples this rank consumed (restored exactly, or the data repeats)."""

    def __init__(self) -> None:
        self.samples = 0

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples = state["samples"]


def digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    value = 0
    for tensor in [*model.state_dict().values(), *_momenta(optimizer)]:
        value = zlib.crc32(tensor.detach().contiguous().numpy().tobytes(), value)
    return value


def _momenta(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        optimizer.state[p]["momentum_buffer"]
        for group in optimizer.param_groups
        for p in group["params"]
        if "momentum_buffer" in optimizer.state.get(p, {})
    ]


def main() -> None:
    out = Path(os.environ["OUT_DIR"])
    # torch's env:// on the agent's store, not trainkit.init(): trainkit.dist namespaces that store
    # by restart count, which differs between a survivor (1) and a replacement pod's worker (0),
    # so the two never meet after a pod loss (reported; not this test's subject).
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    world = World.from_env()
    log = out / f"{socket.gethostname()}-rank{world.rank}-restart{world.restart_count}.jsonl"

    def record(kind: str, **fields: object) -> None:
        line = json.dumps(
            {
                "kind": kind,
                "rank": world.rank,
                "host": socket.gethostname(),
                "t": time.time(),
                **fields,
            }
        )
        with log.open("a") as handle:
            handle.write(line + "\n")

    hidden = int(os.environ.get("HIDDEN", "64"))
    torch.manual_seed(0)
    model = nn.Linear(hidden, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    position = Position()
    state = {"model": model, "optim": optimizer, "data": position}
    storage = os.environ["STORAGE_URL"]
    options = None
    if storage.startswith("s3://"):
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {
                "endpoint_url": os.environ["S3_ENDPOINT"],
                "region_name": "us-east-1",
            },
            "use_listings_cache": False,
        }
    ckpt = CheckpointManager(
        storage,
        world=world,
        storage_options=options,
        interval_steps=int(os.environ.get("STORAGE_EVERY", "5")),
        keep_last=2,
        signals=None,
        memory_interval_steps=int(os.environ.get("MEMORY_EVERY", "2")),
    )
    restored = ckpt.restore(state)
    memory = ckpt.memory
    assert memory is not None
    record(
        "restore",
        step=restored,
        tier=memory.last_restore.get("tier"),
        digest=digest(model, optimizer),
        samples=position.samples,
        restart=world.restart_count,
        replica_address=os.environ.get("TRAINKIT_REPLICA_ADDRESS"),
        memory_root=os.environ.get("TRAINKIT_MEMORY_ROOT"),
    )
    max_steps = int(os.environ.get("MAX_STEPS", "1000000"))
    kill_rank = int(os.environ.get("KILL_RANK", "-1"))
    kill_step = int(os.environ.get("KILL_STEP", "-1"))
    stop_file = os.environ.get("STOP_FILE")
    sleep_s = float(os.environ.get("STEP_SLEEP_S", "0"))
    step = restored or 0
    while step < max_steps:
        step += 1
        # Sample i of this rank is a pure function of i: a repeated or skipped sample shows.
        first = position.samples
        data = torch.stack(
            [
                torch.randn(hidden, generator=torch.Generator().manual_seed(world.rank << 32 | i))
                for i in range(first, first + BATCH)
            ]
        )
        loss = model(data).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        for parameter in model.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= world.world_size
        optimizer.step()
        position.samples += BATCH
        ckpt.maybe_save(step, state)
        record(
            "step",
            step=step,
            first_sample=first,
            digest=digest(model, optimizer),
            replicated=memory.replicator.replicated_step if memory.replicator else None,
        )
        if world.rank == kill_rank and world.restart_count == 0 and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # right after the snapshot started: mid-write
        flag = torch.tensor([1 if stop_file and os.path.exists(stop_file) else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            break
        time.sleep(sleep_s)
    ckpt.close()
    record("done", step=step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
