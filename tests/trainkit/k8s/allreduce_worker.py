"""Worker for the namespace-pod rendezvous tests: all_reduce checks and one JSON line per round.

Run by torchrun / trainkit-run inside a namespace pod. Writes ``<OUT>/<hostname>-<rank>-<port>.json``
after each all_reduce (MASTER_PORT is fresh in every rendezvous round of the k8s backend). With ``STOP_FILE`` set it keeps doing all_reduces until that file exists.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    out = Path(os.environ["OUT_DIR"])
    stop_file = os.environ.get("STOP_FILE")
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    ok = value.item() == world_size * (world_size + 1) / 2
    record = {
        "hostname": socket.gethostname(),
        "rank": rank,
        "world_size": world_size,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "group_world_size": int(os.environ["GROUP_WORLD_SIZE"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": int(os.environ["MASTER_PORT"]),
        "sum": value.item(),
        "ok": ok,
    }
    name = f"{record['hostname']}-{rank}-{record['master_port']}.json"
    (out / name).write_text(json.dumps(record))
    while stop_file:
        # Every rank takes the same decision at the same step, so no collective is left unmatched.
        stop = torch.tensor([1.0 if Path(stop_file).exists() else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            break
        time.sleep(0.2)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
