"""torchrun's worker environment for one Ray Train worker: a pure function of the worker's place.

It never reads ``os.environ`` and never imports Ray or torch, so the contract with
``trainkit.World.from_env`` is checked in one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trainkit.env_vars import APPLIED_VARIABLE
from trainkit.metrics.settings import METRICS_DIR_VARIABLE
from trainkit.preemption import EXIT_STATUS_DIR_VARIABLE

__all__ = ["FORWARDED_PREFIXES", "WorkerPlace", "forwarded_variables", "torchrun_worker_env"]

#: Driver variables that reach the workers on every node, as they reach trainkit-run's workers by
#: inheritance. Node-local paths (exit-status and metrics directories) are set per node instead.
FORWARDED_PREFIXES = ("TRAINKIT_", "NCCL_", "GLOO_", "TORCH_")
_NOT_FORWARDED = {EXIT_STATUS_DIR_VARIABLE, METRICS_DIR_VARIABLE, APPLIED_VARIABLE}

# What torch.distributed.run exports for its workers to handle (its own default).
_SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


@dataclass(frozen=True, kw_only=True)
class WorkerPlace:
    """Where one worker sits in the current attempt, as Ray Train placed it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    restart_count: int
    max_restarts: int
    run_id: str


def forwarded_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The driver's variables that every worker gets (trainkit, NCCL, gloo, torch, OpenMP threads)."""
    return {
        name: value
        for name, value in env.items()
        if (name.startswith(FORWARDED_PREFIXES) or name == "OMP_NUM_THREADS")
        and not name.startswith("TORCHELASTIC_")
        and name not in _NOT_FORWARDED
    }


def torchrun_worker_env(
    place: WorkerPlace, *, error_file: str, driver_env: Mapping[str, str]
) -> dict[str, str]:
    """The variables torch.distributed.run's agent sets for a worker, with the same names and values.

    ``TORCHELASTIC_USE_AGENT_STORE`` is ``True`` because, as under torchrun, the store at
    ``MASTER_ADDR:MASTER_PORT`` is hosted by the supervisor (here rank 0's Ray Train worker) and
    outlives the training process. ``driver_env`` holds the forwarded driver variables: as under
    torchrun, its ``OMP_NUM_THREADS`` and ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` win, and
    ``OMP_NUM_THREADS`` is 1 when several workers share a node and the user chose nothing.
    """
    env = {
        "RANK": str(place.rank),
        "LOCAL_RANK": str(place.local_rank),
        "GROUP_RANK": str(place.node_rank),
        "ROLE_RANK": str(place.rank),
        "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": str(place.local_world_size),
        "WORLD_SIZE": str(place.world_size),
        "GROUP_WORLD_SIZE": str(place.num_nodes),
        "ROLE_WORLD_SIZE": str(place.world_size),
        "MASTER_ADDR": place.master_addr,
        "MASTER_PORT": str(place.master_port),
        "TORCHELASTIC_RESTART_COUNT": str(place.restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(place.max_restarts),
        "TORCHELASTIC_RUN_ID": place.run_id,
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_ERROR_FILE": error_file,
        "TORCHELASTIC_SIGNALS_TO_HANDLE": _SIGNALS_TO_HANDLE,
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": driver_env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }
    if "OMP_NUM_THREADS" in driver_env:
        env["OMP_NUM_THREADS"] = driver_env["OMP_NUM_THREADS"]
    elif place.local_world_size > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env
