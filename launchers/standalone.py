"""Single-node rendezvous of ``trainkit-run``: torch's c10d standalone, kept on loopback and signed.

torch's ``--standalone`` store listens on every address of the machine and its state is a pickle
that the launcher loads on each sync; here both stores listen on loopback only and the state is
signed with a key that never leaves this process. Registered with torch only when trainkit-run runs.
"""

from __future__ import annotations

import argparse
import secrets
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

from torch.distributed.run import parse_min_max_nnodes

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

__all__ = ["BACKEND_NAME", "LOOPBACK", "create_standalone_handler", "use_standalone_rendezvous"]

BACKEND_NAME = "trainkit-standalone"
#: Both the address the stores listen on (its first address) and MASTER_ADDR, as torchrun gives.
LOOPBACK = "localhost"


def create_standalone_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's dynamic rendezvous on a loopback-only store, its state signed with a per-launch key."""
    from trainkit.k8s.bound_store import listening_tcp_store
    from trainkit.k8s.identity import read_pod_identity
    from trainkit.k8s.rendezvous import wrap_dynamic_handler

    read_timeout_s = params.get_as_int("read_timeout", 60) or 60
    store = listening_tcp_store(LOOPBACK, 0, timeout=timedelta(seconds=read_timeout_s))
    return wrap_dynamic_handler(
        params,
        store,
        key=secrets.token_bytes(32),  # one node signs and verifies: no one else needs the key
        identity=read_pod_identity(),
        advertise_addr=LOOPBACK,
        static_num_nodes=None,
        backend_name=BACKEND_NAME,
    )


def use_standalone_rendezvous(args: argparse.Namespace) -> bool:
    """Point ``args`` at this backend for every single-node launch without a rendezvous endpoint.

    That is ``--standalone`` and the static backend on one node: torch 2.13 turns the latter into
    standalone itself unless ``--master-port`` is given, and then reuses one store for every
    restart, so a script's restarted process group reads the previous attempt's addresses. Here
    each round's workers get a fresh loopback store instead (``--master-port`` is not used).
    Registers the backend with torch.
    """
    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    implicit = args.rdzv_backend == "static" and not args.rdzv_endpoint and max_nodes == 1
    if not (args.standalone or implicit):
        return False
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(BACKEND_NAME, create_standalone_handler)
    args.standalone = False
    args.rdzv_backend = BACKEND_NAME
    args.rdzv_endpoint = f"{LOOPBACK}:0"
    args.rdzv_id = str(uuid.uuid4())
    return True
