"""``trainkit rdzv-store``: the rendezvous store in its own small pod, so no training pod is special.

Runs torch's own TCPStore server, listening on the pod IP only, until SIGTERM/SIGINT; training pods
reach it through a Service and ``--rdzv-conf store_service=<service>`` and sign the state they keep
in it. It keeps no state on disk, never unpickles anything and never touches training data.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from datetime import timedelta

from trainkit.env_vars import DEFAULT_RDZV_PORT

__all__ = ["register", "run_store"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rdzv-store",
        help="run the k8s rendezvous store (for a separate store pod behind its own Service)",
        description=(
            "Serve torch's TCPStore for the k8s rendezvous backend. Give the store pod a Service "
            "(e.g. rdzv-store) and start training pods with --rdzv-conf store_service=rdzv-store."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_RDZV_PORT,
        help=f"port to listen on (default {DEFAULT_RDZV_PORT})",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on (default: POD_IP, the pod's own address from the downward API; "
        "without it every address, as torch's own store)",
    )
    parser.set_defaults(func=run_store)


def run_store(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    from trainkit.k8s.bound_store import listening_tcp_store

    if not 0 < args.port < 65536:
        print(f"trainkit rdzv-store: --port {args.port} must be in 1..65535", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = args.host or os.environ.get("POD_IP", "").strip()
    if not host:
        host = "::"
        print(
            "trainkit rdzv-store: no --host and no POD_IP: listening on every address; set POD_IP "
            "from the downward API (status.podIP) to listen on the pod IP only",
            file=sys.stderr,
            flush=True,
        )
    try:
        store = listening_tcp_store(host, args.port, timeout=timedelta(seconds=60))
    except (OSError, RuntimeError, ValueError) as error:
        print(
            f"trainkit rdzv-store: cannot listen on {host} port {args.port}: {error}; pick a free "
            "--port and an address of this pod for --host",
            file=sys.stderr,
        )
        return 1
    print(f"trainkit rdzv-store: listening on {host} port {store.port}", flush=True)
    stop.wait()
    print("trainkit rdzv-store: stopping", flush=True)
    return 0


if __name__ == "__main__":
    # ``python -m trainkit.k8s.cli rdzv-store ...``, for images without the console script.
    _parser = argparse.ArgumentParser(prog="trainkit")
    register(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    sys.exit(_args.func(_args))
