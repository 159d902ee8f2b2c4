"""``trainkit rdzv-store``: the rendezvous store in its own small pod, so no training pod is special.

Runs torch's own TCPStore server until SIGTERM/SIGINT; training pods reach it through a Service and
``--rdzv-conf store_service=<service>``. It keeps no state on disk and never touches training data.
"""

from __future__ import annotations

import argparse
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
        "--host", default="::", help="address to bind (default ::, all IPv4 and IPv6 addresses)"
    )
    parser.set_defaults(func=run_store)


def run_store(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    from torch.distributed import TCPStore

    if not 0 < args.port < 65536:
        print(f"trainkit rdzv-store: --port {args.port} must be in 1..65535", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        store = TCPStore(
            args.host,
            args.port,
            is_master=True,
            multi_tenant=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=60),
        )
    except (RuntimeError, ValueError) as error:
        print(
            f"trainkit rdzv-store: cannot listen on port {args.port}: {error}; pick a free --port",
            file=sys.stderr,
        )
        return 1
    print(f"trainkit rdzv-store: listening on port {store.port}", flush=True)
    stop.wait()
    print("trainkit rdzv-store: stopping", flush=True)
    return 0


if __name__ == "__main__":
    # ``python -m trainkit.k8s.cli rdzv-store ...``, for images without the console script.
    _parser = argparse.ArgumentParser(prog="trainkit")
    register(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    sys.exit(_args.func(_args))
