"""Test worker for the preemption contract.

    trainkit-run --standalone --nproc-per-node 2 preemption_worker.py rogue OUT
    python preemption_worker.py never-saves OUT      # then SIGTERM it

rogue: rank 1 exits 75 at once without an agreed save (a crash that happens to use 75); rank 0 is
healthy. never-saves: builds a CheckpointManager, never calls maybe_save, sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainkit.checkpoint import EXIT_PREEMPTED, CheckpointManager


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "rogue":
        if os.environ["RANK"] == "1":
            os._exit(EXIT_PREEMPTED)
        time.sleep(120)
        return
    CheckpointManager(out / "ckpt", grace_period_s=float(os.environ.get("GRACE_S", "1")))
    (out / "ready").write_text("1")
    for _ in range(1200):
        time.sleep(0.1)


if __name__ == "__main__":
    main()
