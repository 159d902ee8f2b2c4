"""Process-group life cycle for a worker: pick the backend, join the group, bind the device.

``init()`` is idempotent; it learns the world only from its ``World`` (never from launcher
variables directly) and writes to the process environment in one place, ``_export_comms_plan``.
Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from datetime import timedelta

from trainkit.world import World

__all__ = [
    "collective_timeout",
    "current_world",
    "init",
    "is_initialized",
    "resolve_backend",
    "shutdown",
]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_world: World | None = None
_timeout: timedelta | None = None


def resolve_backend(backend: str, *, cuda_available: bool) -> str:
    """Turn ``"auto"`` into a concrete backend string; pass explicit choices through.

    ``auto`` is ``cpu:gloo,cuda:nccl`` when CUDA is usable, so CPU tensors (checkpoint and
    preemption coordination) and GPU tensors both have a backend; otherwise ``gloo``.
    """
    if backend == "auto":
        return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"
    if not backend:
        raise ValueError(
            "backend must be 'auto', 'gloo', 'nccl' or a device map like 'cpu:gloo,cuda:nccl'"
        )
    if "nccl" in backend and not cuda_available:
        raise ValueError(
            f"backend {backend!r} needs CUDA, but torch.cuda.is_available() is False in this process; "
            "use backend='auto' or 'gloo' on CPU"
        )
    return backend


def _format_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


#: torch's switch that gives every rendezvous round a fresh agent store (trainkit-run sets it).
_FRESH_STORE_EACH_ROUND = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _agent_store(world: World, timeout: timedelta, env: Mapping[str, str]):
    """A client of the elastic agent's store, namespaced by restart attempt when it is shared.

    torch's env:// path reuses the agent's store unprefixed; after a worker-group restart the new
    gloo group can then read the previous attempt's addresses and fail with "Connection refused"
    (seen with torch 2.13). A prefix per restart keeps every attempt's keys apart. When each
    round gets a fresh store (trainkit-run sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) no prefix
    is needed, and none may depend on the restart count: a pod that joins later counts its own
    restarts from 0, and its workers would wait forever for keys under another attempt.
    """
    import torch.distributed as dist

    client = dist.TCPStore(
        world.master_addr,
        world.master_port,
        world_size=world.world_size,
        is_master=False,
        timeout=timeout,
    )
    if env.get(_FRESH_STORE_EACH_ROUND) == "1":
        return dist.PrefixStore("trainkit/round", client)
    return dist.PrefixStore(f"trainkit/attempt-{world.restart_count}", client)


def _export_comms_plan(process_env: MutableMapping[str, str]) -> None:
    """Set the comms plan's NCCL variables the user left unset, in the process environment.

    The one write to the environment: NCCL (C++) reads its variables with getenv() when a
    communicator is created, so they must be in this process's real environment, not in a copy.
    A no-op for what trainkit-run already applied, and it never overrides the user's settings.
    """
    from trainkit.comms import apply_plan

    apply_plan(process_env)


def _rendezvous(world: World, timeout: timedelta, env: Mapping[str, str]) -> dict[str, object]:
    """``init_process_group`` arguments that join ``world``, taken from the ``World`` alone.

    A world of one needs no network (an in-memory store avoids port clashes); under a launcher
    whose agent serves the store (``use_agent_store``) workers join that store; otherwise rank 0
    hosts a store at ``master_addr:master_port``, as torch's env:// would, but from the ``World``
    passed in rather than from whatever ``MASTER_ADDR`` the process environment holds.
    """
    import torch.distributed as dist

    if world.source == "single":
        return {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    if world.use_agent_store:
        return {
            "store": _agent_store(world, timeout, env),
            "rank": world.rank,
            "world_size": world.world_size,
        }
    return {
        "init_method": f"tcp://{_format_host(world.master_addr)}:{world.master_port}",
        "rank": world.rank,
        "world_size": world.world_size,
    }


def init(
    *,
    backend: str = "auto",
    timeout: timedelta = timedelta(minutes=10),
    world: World | None = None,
) -> World:
    """Join the training world and return it. Calling again returns the same ``World``.

    Before joining, the pod's comms plan (``trainkit.comms.apply_plan``) sets the NCCL variables
    the user left unset; ``TRAINKIT_REQUIRE_RDMA=1`` turns a TCP fallback into an error here.

    Args:
        backend: ``"auto"`` (default), ``"gloo"``, ``"nccl"`` or a device map such as
            ``"cpu:gloo,cuda:nccl"``.
        timeout: collective and rendezvous timeout (default 10 minutes).
        world: the world to join; default ``World.from_env()`` of the process environment.
    """
    global _world, _timeout
    import torch
    import torch.distributed as dist

    with _lock:
        if _world is not None and dist.is_initialized():
            return _world
        process_env = os.environ
        world = world or World.from_env(process_env)
        cuda_available = torch.cuda.is_available()
        resolved = resolve_backend(backend, cuda_available=cuda_available)

        device_id = None
        if cuda_available and "nccl" in resolved:
            num_devices = torch.cuda.device_count()
            if world.local_rank >= num_devices:
                raise ValueError(
                    f"local_rank {world.local_rank} has no GPU: this process sees {num_devices} "
                    "(check CUDA_VISIBLE_DEVICES and --nproc-per-node)"
                )
            torch.cuda.set_device(world.local_rank)
            device_id = torch.device("cuda", world.local_rank)

        if not dist.is_initialized():
            # Before joining: NCCL reads the plan's variables when the communicator is created.
            _export_comms_plan(process_env)
            kwargs: dict[str, object] = {"backend": resolved, "timeout": timeout}
            if device_id is not None:
                kwargs["device_id"] = device_id
            kwargs.update(_rendezvous(world, timeout, process_env))
            dist.init_process_group(**kwargs)  # type: ignore[arg-type]
            _timeout = timeout
            logger.info(
                "trainkit: rank %d/%d joined (backend %s, source %s)",
                world.rank,
                world.world_size,
                resolved,
                world.source,
            )
        _world = world
        return world


def collective_timeout() -> timedelta | None:
    """The ``timeout`` this process's ``init()`` created the process group with, for the groups
    other parts create later (torch's ``new_group`` would otherwise use its own 30 min default,
    and a rank blocked on a lost peer would wait that long). None when ``init()`` did not create
    the group (a script that called ``init_process_group`` itself): torch's default then applies.
    """
    return _timeout if current_world() is not None else None


def is_initialized() -> bool:
    return current_world() is not None


def current_world() -> World | None:
    """The world passed to or found by ``init()``, or None before it (and after ``shutdown()``)."""
    import torch.distributed as dist

    return _world if _world is not None and dist.is_initialized() else None


def shutdown(*, timeout_s: float | None = None) -> bool:
    """Leave the process group; every rank calls it. Safe to call twice or without ``init()``.

    With ``timeout_s``, give up waiting after that long (a peer frozen or cut off never reaches
    the barrier) and return False, the group left as it is; errors are then logged, not raised.
    True when the group was left.
    """
    if timeout_s is None:
        _leave()
        return True
    done = threading.Event()

    def leave() -> None:
        try:
            _leave()
        except Exception:
            logger.exception("trainkit: leaving the process group failed")
        finally:
            done.set()

    threading.Thread(target=leave, name="trainkit-leave-group", daemon=True).start()
    return done.wait(timeout_s)


def _leave() -> None:
    global _world, _timeout
    import torch.distributed as dist

    with _lock:
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() > 1:
                # Leave together: a rank tearing down gloo while a peer still talks to it aborts.
                dist.barrier()
            dist.destroy_process_group()
        _world = None
        _timeout = None
