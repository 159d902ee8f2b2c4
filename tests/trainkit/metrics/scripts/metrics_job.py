"""Test job: gloo all-reduce steps at a steady pace, recording trainkit metrics; logs what it did.

Usage: metrics_job.py OUTDIR [fail-once]. Runs until a rank sees OUTDIR/stop (or 120 s); each rank
appends "unix_time samples_total" lines to OUTDIR/progress-<rank>.txt so tests can compare rates.
"""

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import trainkit
import trainkit.metrics

SAMPLES_PER_STEP = 32
TOKENS_PER_SAMPLE = 16
STEP_SLEEP_S = 0.020  # "compute" per step
DATA_WAIT_S = 0.005  # reported as waiting for data, like ShardedLoader does
FAIL_AFTER_S = 2.0

outdir = Path(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else "ok"
world = trainkit.World.from_env()
# torch 2.13 under torchrun reuses the agent's store across restarts, so a restarted gloo group can
# read its predecessor's stale addresses ("connectFullMesh ... Connection refused"); a key prefix per
# restart avoids that (reported to the lead for trainkit.init).
store = dist.TCPStore(
    world.master_addr, world.master_port, is_master=False, timeout=timedelta(minutes=2)
)
dist.init_process_group(
    "gloo",
    store=dist.PrefixStore(f"restart-{world.restart_count}", store),
    rank=world.rank,
    world_size=world.world_size,
)
trainkit.metrics.configure()
restart = world.restart_count
(outdir / f"env-{world.rank}-{restart}.txt").write_text(os.environ.get("TRAINKIT_METRICS_DIR", ""))

progress = open(outdir / f"progress-{world.rank}.txt", "a", buffering=1)  # noqa: SIM115 (closed at exit)
samples = 0
started = last_log = time.time()
loss = torch.ones(1)
stop = torch.zeros(1)
while True:
    # Every rank stops at the same step: one that left the loop alone would close its connections
    # under a peer still inside all_reduce ("Connection closed by peer").
    stop.fill_(float((outdir / "stop").exists() or time.time() - started >= 120))
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop.item():
        break
    time.sleep(DATA_WAIT_S)
    trainkit.metrics.observe_data_wait(DATA_WAIT_S)
    time.sleep(STEP_SLEEP_S)
    dist.all_reduce(loss)
    loss /= world.world_size
    samples += SAMPLES_PER_STEP
    trainkit.metrics.step(
        samples=SAMPLES_PER_STEP, tokens=SAMPLES_PER_STEP * TOKENS_PER_SAMPLE, loss=2.5
    )
    now = time.time()
    if now - last_log >= 0.25:
        progress.write(f"{now} {samples} {restart}\n")
        last_log = now
    if mode == "fail-once" and restart == 0 and world.rank == 1 and now - started > FAIL_AFTER_S:
        os._exit(3)
progress.write(f"{time.time()} {samples} {restart}\n")
dist.destroy_process_group()
