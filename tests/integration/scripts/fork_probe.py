"""Worker of the --fork-workers test: waits for the fork server in the first attempt, then
reports whether torch was already imported, fails on rank 1 and waits for SIGTERM on rank 0."""

import os
import signal
import sys
import time

preloaded = "torch" in sys.modules
rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
if attempt == "0":
    # Run by the bootstrap itself (no server yet): exit once the server listens.
    option = next(a for a in sys.orig_argv if a.startswith("--fork-server="))
    server = option.split("=", 1)[1]
    deadline = time.monotonic() + 60
    while not os.path.exists(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.exit(3)
print(f"rank {rank} preloaded={preloaded} argv={sys.argv[1:]} pid={os.getpid()}", flush=True)
print(f"rank {rank} stderr", file=sys.stderr, flush=True)
if rank == "1":
    time.sleep(1)
    sys.exit(7)


def on_sigterm(signum: int, frame: object) -> None:
    print(f"rank {rank} got SIGTERM", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, on_sigterm)
time.sleep(60)
