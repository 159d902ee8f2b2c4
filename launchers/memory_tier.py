"""trainkit-run's part of memory-first checkpoints: the pod's memory directory, which outlives
worker restarts and is removed when the job ends, and the peer-replica server on the pod IP.

Workers learn both through ``TRAINKIT_MEMORY_ROOT`` and ``TRAINKIT_REPLICA_ADDRESS``; this module
never reads or writes snapshots itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from trainkit.env_vars import (
    MEMORY_ROOT_VARIABLE,
    REPLICA_ADDRESS_VARIABLE,
    REPLICA_PORT_VARIABLE,
    read_replica_port,
)

__all__ = ["PodMemory", "start_pod_memory"]

logger = logging.getLogger("trainkit.run")

#: The container's memory-backed filesystem; elsewhere the system's temporary directory.
SHM_DIR = "/dev/shm"


class PodMemory:
    """The job's directory under /dev/shm and the replica server (None without a job token)."""

    def __init__(self, directory: str, server: Any) -> None:
        self.directory = directory
        self.server = server

    @property
    def snapshots_dir(self) -> str:
        return os.path.join(self.directory, "ranks")

    def worker_env(self) -> dict[str, str]:
        env = {MEMORY_ROOT_VARIABLE: self.snapshots_dir}
        if self.server is not None:
            host, port = self.server.address
            env[REPLICA_ADDRESS_VARIABLE] = f"{host}:{port}"
        return env

    def close(self) -> None:
        """Stop the server and remove every snapshot and replica of the job (job end only)."""
        if self.server is not None:
            self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _replica_host(env: Mapping[str, str]) -> str:
    from trainkit.k8s.identity import read_pod_identity

    identity = read_pod_identity(env)
    if identity.pod_ip is not None:
        return identity.pod_ip
    return "127.0.0.1"


def start_pod_memory(run_id: str, env: Mapping[str, str], *, port: int | None = None) -> PodMemory:
    """Create the job's memory directory and, when ``TRAINKIT_JOB_TOKEN`` is set, start the replica
    server on the pod IP (``TRAINKIT_REPLICA_PORT``, default 29410; workers exchange the addresses
    through their process group; ``port`` 0 picks a free one)."""
    from trainkit.k8s.signed_state import read_job_token

    parent = SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)[:64] or "run"
    directory = tempfile.mkdtemp(prefix=f"trainkit-{safe_id}-", dir=parent)
    os.makedirs(os.path.join(directory, "ranks"))
    token = read_job_token(env)
    server = None
    if token is not None:
        from trainkit.checkpoint.peer import ReplicaServer

        server = ReplicaServer(
            os.path.join(directory, "replicas"),
            host=_replica_host(env),
            port=read_replica_port(env) if port is None else port,
            token=token,
        )
        try:
            server.start()
        except OSError as error:
            chosen = port is not None or env.get(REPLICA_PORT_VARIABLE, "").strip() != ""
            if chosen:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            # The implicit default taken (a second launcher in the pod): train without replicas.
            print(
                f"trainkit-run: peer replicas off: {error.strerror or error}",
                file=sys.stderr,
                flush=True,
            )
            server = None
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return PodMemory(directory, server)
