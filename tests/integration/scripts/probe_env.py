"""Worker probe: write this worker's environment, World, argv and sys.path[0] to <outdir>/rank-<RANK>.json.

Modes: ok, fail-once, fail-always, sleep (writes its pid to ready-<RANK>, records SIGTERM).
"""

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

outdir = Path(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else "ok"
rank = os.environ["RANK"]
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

if mode == "sleep":
    # Record SIGTERM arrival, then linger so the launcher's shutdown timeout is observable.
    def on_term(signum, frame):
        (outdir / f"sigterm-{rank}").write_text(str(time.time()))
        time.sleep(float(os.environ.get("PROBE_LINGER_S", "1")))
        code = int(os.environ.get("PROBE_TERM_EXIT", "0")) or 128 + signum
        from trainkit.exit_codes import record_worker_exit

        record_worker_exit(code, step=0, committed=code == 75)
        sys.exit(code)

    signal.signal(signal.SIGTERM, on_term)
    (outdir / f"ready-{rank}").write_text(str(os.getpid()))
    time.sleep(120)
    sys.exit(0)

from trainkit.world import World  # noqa: E402


def parent_death_signal() -> int:
    signum = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
    return signum.value


record = {
    "env": dict(os.environ),
    "world": World.from_env().as_dict(),
    "argv": sys.argv,
    "path0": sys.path[0],
    "name": __name__,
    "parent_death_signal": parent_death_signal(),
}
(outdir / f"rank-{rank}-restart-{restart}.json").write_text(json.dumps(record))
if mode == "fail-once" and rank == "1" and restart == 0:
    sys.exit(3)
if mode == "fail-always" and rank == "1":
    sys.exit(3)
