"""``trainkit bench collectives``: the collective benchmark from the command line.

Inside a launched world (any environment ``World.from_env`` recognises) it measures in place;
otherwise it starts ``--nproc-per-node`` local processes with torch's own launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from trainkit.comms.bench import add_bench_arguments

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks of this pod's runtime paths")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    collectives = kinds.add_parser(
        "collectives",
        help="all_reduce/all_gather/reduce_scatter/broadcast/alltoall sweep with nccl-tests' algbw/busbw",
        description="Run inside a world (trainkit-run ... -m trainkit.comms.bench) or standalone "
        "with --nproc-per-node local processes.",
    )
    add_bench_arguments(collectives)
    collectives.add_argument(
        "--nproc-per-node",
        type=int,
        default=2,
        help="processes to start when not already inside a world (default 2)",
    )
    collectives.set_defaults(func=run_collectives_command)


def _forwarded(args: argparse.Namespace, json_path: str) -> list[str]:
    flags = [
        "--ops",
        args.ops,
        "-b",
        args.min_bytes,
        "-e",
        args.max_bytes,
        "-f",
        str(args.step_factor),
        "-n",
        str(args.iters),
        "-w",
        str(args.warmup_iters),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--pair-bytes",
        args.pair_bytes,
        "--slow-threshold",
        str(args.slow_threshold),
    ]
    if args.min_busbw is not None:
        flags += ["--min-busbw", str(args.min_busbw)]
    if args.pairwise:
        flags.append("--pairwise")
    return [*flags, "--json", json_path, "--gate-in-json"]


def run_collectives_command(args: argparse.Namespace) -> int:
    from trainkit.comms import bench
    from trainkit.world import World

    if World.from_env().source != "single":
        return bench.run_in_world(args)
    if args.nproc_per_node < 1:
        raise SystemExit(f"--nproc-per-node ({args.nproc_per_node}) must be at least 1")
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-") as scratch:
        # The ranks write the gate's verdict instead of exiting 1 with it: torchrun would turn a
        # failed gate into a ChildFailedError traceback. A crashed rank still fails torchrun.
        json_path = os.path.abspath(args.json_path or os.path.join(scratch, "bench.json"))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc_per_node}",
            "-m",
            "trainkit.comms.bench",
            *_forwarded(args, json_path),
        ]
        code = subprocess.call(command)
        if code != 0 or args.min_busbw is None:
            return code
        with open(json_path) as handle:
            failures = json.load(handle)["gate"]["failures"]
    return 1 if failures else 0
