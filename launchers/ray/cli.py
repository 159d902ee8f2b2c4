"""The ``trainkit-ray`` command line: parse, check, launch, exit with trainkit-run's exit codes.

Usage errors exit 2 before Ray is contacted; everything else is ``launchers.ray.run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainkit-ray",
        description="Run a training script on a Ray cluster through Ray Train; every worker gets "
        "torchrun's environment. Exit codes as trainkit-run: 0, 75 (preempted after SIGTERM, "
        "checkpoint committed), 1 (a worker failed after the restarts), 128+N (signal N).",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        required=True,
        help="training processes (Ray Train workers), one CPU each unless told otherwise",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="auto (default: RAY_ADDRESS, else the cluster on this machine), HOST:PORT of the head, "
        "ray://HOST:PORT, or local to start a throw-away cluster",
    )
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument(
        "--resources-per-worker",
        default=None,
        help='Ray resources per worker as JSON, e.g. \'{"CPU": 4, "GPU": 1}\'',
    )
    parser.add_argument(
        "--max-failures",
        "--max-restarts",
        dest="max_failures",
        type=int,
        default=0,
        help="worker-group failures to recover from (Ray Train's max_failures); restarted workers "
        "resume from their committed checkpoints (default 0)",
    )
    parser.add_argument("--run-id", default=None, help="TORCHELASTIC_RUN_ID and Ray Train run name")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve each node's Prometheus /metrics on this port, 0 to disable (default: "
        "TRAINKIT_METRICS_PORT, else 9400 inside a Kubernetes pod and off elsewhere)",
    )
    parser.add_argument(
        "--grace-period-s",
        type=float,
        default=None,
        help="seconds from SIGTERM to SIGKILL for the workers' preemption save (default: "
        "TRAINKIT_GRACE_PERIOD_S, else 30)",
    )
    parser.add_argument(
        "--start-timeout-s",
        type=float,
        default=600.0,
        help="give up when Ray has not placed the workers within this many seconds (default 600)",
    )
    parser.add_argument(
        "--storage",
        "--storage-path",
        dest="storage",
        default=None,
        help="Ray Train run storage, a path or URL every node reaches (default ~/ray_results)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable for every worker (repeatable); TRAINKIT_*, NCCL_*, GLOO_*, TORCH_* and "
        "OMP_NUM_THREADS of this process are forwarded anyway",
    )
    parser.add_argument(
        "-m", "--module", action="store_true", help="run the target as a module (python -m)"
    )
    parser.add_argument("training_script", help="the script (or module with -m) to run")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return parser


def _parse_env(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"--env {pair!r}: expected NAME=VALUE, e.g. --env NCCL_DEBUG=INFO")
        env[name] = value
    return env


def _parse_resources(parser: argparse.ArgumentParser, raw: str | None) -> dict[str, float] | None:
    if raw is None:
        return None
    try:
        resources = json.loads(raw)
    except ValueError as error:
        parser.error(f"--resources-per-worker {raw!r}: not JSON ({error}); e.g. '{{\"CPU\": 2}}'")
    if not isinstance(resources, dict):
        parser.error(f"--resources-per-worker {raw!r}: expected a JSON object of resource amounts")
    return resources


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), launch, print the outcome, return the exit code."""
    from launchers.ray.api import run as launch

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        result = launch(
            args.training_script,
            args.training_script_args,
            num_workers=args.num_workers,
            module=args.module,
            use_gpu=args.use_gpu,
            resources_per_worker=_parse_resources(parser, args.resources_per_worker),
            max_failures=args.max_failures,
            run_id=args.run_id,
            env=_parse_env(parser, args.env),
            metrics_port=args.metrics_port,
            grace_period_s=args.grace_period_s,
            address=args.address,
            storage=args.storage,
            start_timeout_s=args.start_timeout_s,
        )
    except ValueError as error:
        parser.error(str(error))
    except ConnectionError as error:
        print(
            f"trainkit-ray: cannot reach the Ray cluster: {error}; start one with "
            "`ray start --head`, check --address (HOST:PORT of the head's GCS port, 6379 by "
            "default), or pass --address local for a throw-away one",
            file=sys.stderr,
            flush=True,
        )
        return 2
    print(f"trainkit-ray: {result.message}", file=sys.stderr, flush=True)
    return result.exit_code


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
