"""``trainkit-run``: torchrun with pod defaults, a grace period for preemption and telling exit codes.

Options come from torch's own ``torch.distributed.run`` parser, so every torchrun flag, default and
``PET_*`` variable works unchanged; workers are started and supervised by torch.distributed.elastic.
This module never supervises processes itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from trainkit.preemption import (
    EXIT_PREEMPTED,
    EXIT_STATUS_DIR_VARIABLE,
    GRACE_PERIOD_VARIABLE,
    ExitRecord,
    describe_exit_code,
    launcher_exit_code,
    preemption_agreed,
    read_exit_records,
    read_grace_period_s,
)

if TYPE_CHECKING:
    from launchers.fork_server import ForkServer

__all__ = [
    "bind_workers_to_launcher",
    "build_parser",
    "explicit_options",
    "main",
    "resolve_exit_code",
]

logger = logging.getLogger("trainkit.run")

#: What makes a directory runnable as ``python DIR`` (runpy looks up the module ``__main__``).
MAIN_FILES = ("__main__.py", "__main__.pyc")

#: torch's switch for the agent store it shares with workers across restarts (see ``run``).
SHARED_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def build_parser() -> argparse.ArgumentParser:
    """torch's torchrun parser, renamed, with trainkit's own options in a separate group."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "trainkit-run"
    parser.description = (
        "Launch distributed training workers: every torchrun option, plus Kubernetes pod defaults. "
        f"--shutdown-timeout defaults from {GRACE_PERIOD_VARIABLE} when set (set it a few seconds "
        "below the pod's terminationGracePeriodSeconds)."
    )
    pod = parser.add_argument_group("trainkit")
    pod.add_argument(
        "--service",
        default=None,
        help="headless Service whose DNS records list the job's pods (default: TRAINKIT_SERVICE, "
        "else the pod's subdomain); inside a pod without explicit rendezvous flags it selects "
        "--rdzv-backend k8s",
    )
    pod.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the pod's Prometheus /metrics on this port, 0 to disable (default: "
        "TRAINKIT_METRICS_PORT, else 9400 inside a Kubernetes pod and off elsewhere)",
    )
    pod.add_argument(
        "--metrics-host",
        default=None,
        help="address /metrics listens on (default: TRAINKIT_METRICS_HOST, else the pod IP in a "
        "pod and 127.0.0.1 elsewhere; 0.0.0.0 for every interface)",
    )
    pod.add_argument(
        "--fork-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start Python workers from a fork server that imported torch once, so a restart "
        "skips the imports (default: on; --no-python and --run-path workers start as usual)",
    )
    return parser


def explicit_options(
    parser: argparse.ArgumentParser, argv: Sequence[str], env: Mapping[str, str]
) -> set[str]:
    """Destinations the user chose: given on the command line or through a ``PET_<DEST>`` variable."""
    sentinel = object()
    namespace = argparse.Namespace(
        **{action.dest: sentinel for action in parser._actions if action.dest != argparse.SUPPRESS}
    )
    parser.parse_args(list(argv), namespace=namespace)
    chosen = {dest for dest, value in vars(namespace).items() if value is not sentinel}
    chosen |= {
        action.dest
        for action in parser._actions
        if action.option_strings and env.get(f"PET_{action.dest.upper()}", "") != ""
    }
    return chosen


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what torchrun would only notice later (with a traceback) as a usage error, exit 2."""
    from torch.distributed.run import parse_min_max_nnodes

    try:
        min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    except (RuntimeError, ValueError):
        parser.error(
            f"--nnodes {args.nnodes!r}: expected N or MIN:MAX with integers, e.g. 2 or 1:4"
        )
    if not 0 < min_nodes <= max_nodes:
        parser.error(
            f"--nnodes {args.nnodes}: the minimum ({min_nodes}) must be at least 1 and not above "
            f"the maximum ({max_nodes})"
        )
    if args.max_restarts < 0:
        parser.error(f"--max-restarts {args.max_restarts}: must be 0 or more")
    if args.shutdown_timeout is not None and args.shutdown_timeout < 0:
        parser.error(f"--shutdown-timeout {args.shutdown_timeout}: must be 0 or more seconds")
    _validate_nproc_per_node(parser, str(args.nproc_per_node))
    if args.module and args.no_python and not args.run_path:
        # torch refuses this too, but only after the worker bootstrap has rewritten the command.
        parser.error("-m and --no-python cannot be used together: pick a module or a program")
    if args.module:
        return
    script = args.training_script
    if args.no_python and not args.run_path:
        if shutil.which(script) is None:
            parser.error(
                f"program {script!r} not found (with --no-python it must be an executable on PATH)"
            )
    elif Path(script).is_dir():
        # `python DIR` (what torchrun starts) runs DIR/__main__.py, as for a zip archive.
        if not any((Path(script) / name).is_file() for name in MAIN_FILES):
            parser.error(
                f"training script {script!r} is a directory without __main__.py; python can only "
                "run a directory that has one (or give the script inside it)"
            )
    elif not Path(script).is_file():
        parser.error(
            f"training script {script!r} does not exist (looked in {os.getcwd()}); "
            "use -m for a module, --no-python for a program"
        )


def _validate_nproc_per_node(parser: argparse.ArgumentParser, nproc: str) -> None:
    """Accept exactly what torchrun accepts, through torch's own resolver.

    That includes an out-of-tree accelerator's name (``npu``) once its backend is loaded, as torch
    does when it imports. A name torch refuses is a usage error with torch's reason.
    """
    try:
        number = int(nproc)
    except ValueError:
        pass
    else:
        if number < 1:
            parser.error(f"--nproc-per-node {nproc}: must be at least 1")
        return
    from torch.distributed.run import determine_local_world_size

    try:
        count = determine_local_world_size(nproc)
    except (RuntimeError, ValueError) as error:
        parser.error(
            f"--nproc-per-node {nproc!r}: {error} (torch accepts a positive integer, auto, cpu, "
            "gpu, xpu or the name of a loaded out-of-tree accelerator backend)"
        )
    if count < 1:
        parser.error(f"--nproc-per-node {nproc}: this machine has no {nproc} device to run on")


def apply_trainkit_defaults(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    explicit: set[str],
    env: Mapping[str, str],
) -> list[str]:
    """Fill in what trainkit decides when the user did not; returns one line per decision."""
    from launchers.pod_defaults import apply_pod_defaults

    try:
        notes = apply_pod_defaults(args, explicit, env)
    except ValueError as error:
        parser.error(str(error))
    if "shutdown_timeout" not in explicit:
        try:
            grace_s = read_grace_period_s(env)
        except ValueError as error:
            parser.error(str(error))
        if grace_s is not None:
            grace = int(grace_s)
            args.shutdown_timeout = grace
            notes.append(f"--shutdown-timeout {grace} (from {GRACE_PERIOD_VARIABLE})")
    return notes


def bind_workers_to_launcher(
    args: argparse.Namespace, launcher_pid: int, *, fork_server: str | None = None
) -> None:
    """Start every worker through ``launchers.worker_bootstrap`` so it dies with this launcher.

    A SIGKILLed launcher otherwise leaves its workers running (each in its own session), holding
    GPUs and writing into the checkpoint root of the job that replaces it. ``--run-path`` workers
    are forked by multiprocessing, not started as a command, and stay as torch starts them.
    ``fork_server``: the socket of the launcher's ``launchers.fork_server`` (``--fork-workers``).
    """
    from launchers.worker_bootstrap import bootstrap_argv

    if args.run_path:
        return
    if args.no_python:
        mode = "exec"
    elif args.module:
        mode = "module"
    else:
        mode = "script"
    args.training_script_args = bootstrap_argv(
        launcher_pid,
        mode,
        args.training_script,
        args.training_script_args,
        fork_server=None if mode == "exec" else fork_server,
    )
    args.training_script = "launchers.worker_bootstrap"
    args.module, args.no_python = True, False


def resolve_exit_code(
    exit_codes: Mapping[int, int],
    first_rank: int,
    records: Mapping[int, ExitRecord] | None = None,
) -> int:
    """The launcher's exit code from the failed workers' codes (global rank -> code) and the exit
    records they left: EXIT_PREEMPTED only for an agreed, committed preemption; 1 otherwise."""
    return launcher_exit_code(exit_codes, first_rank, records or {})


def _exit_after_signal(sigval: int, status_dir: Path, num_local_workers: int) -> int:
    """After a signal: EXIT_PREEMPTED when every local worker recorded the same committed
    preemption step."""
    records = read_exit_records(status_dir)
    if len(records) >= num_local_workers and preemption_agreed(records, records):
        step = next(iter(records.values())).step
        print(
            f"trainkit-run: got {signal.Signals(sigval).name}; all {len(records)} workers saved the "
            f"agreed checkpoint of step {step} and exited {EXIT_PREEMPTED} (preempted)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_PREEMPTED
    print(f"trainkit-run: stopped by {signal.Signals(sigval).name}", file=sys.stderr, flush=True)
    return 128 + int(sigval)


def _summarise_failure(error: BaseException) -> int:
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    failures = error.failures  # type: ignore[attr-defined]
    # torch's pick: earliest timestamp, ties broken by the order in which the agent saw them.
    rank, first = error.get_first_failure()  # type: ignore[attr-defined]
    # run() exported the exit-status directory before starting the workers.
    records = read_exit_records(Path(os.environ[EXIT_STATUS_DIR_VARIABLE]))
    code = resolve_exit_code(
        {r: failure.exitcode for r, failure in failures.items()}, rank, records
    )
    error_file = first.error_file  # type: ignore[attr-defined]
    if os.path.isfile(error_file):
        # Like torchrun's @record: copy the root cause into this launcher's own error file.
        get_error_handler().dump_error_file(error_file, first.exitcode)  # type: ignore[attr-defined]
    print(error.format_msg(), file=sys.stderr)  # type: ignore[attr-defined]
    print(
        f"trainkit-run: worker rank {rank} (local rank {first.local_rank}) failed first with exit "  # type: ignore[attr-defined]
        f"code {first.exitcode} ({describe_exit_code(first.exitcode)}); error file: {error_file}; "  # type: ignore[attr-defined]
        f"{len(failures)} worker(s) failed; launcher exits {code}",
        file=sys.stderr,
        flush=True,
    )
    return code


def _start_fork_server(args: argparse.Namespace) -> ForkServer:
    """The fork server, started before the rendezvous so its imports overlap with it."""
    from torch.distributed.run import determine_local_world_size

    from launchers.fork_server import ForkServer

    server_env = dict(os.environ)
    # torchrun sets this for the workers later; OpenMP reads it when torch is imported.
    if "OMP_NUM_THREADS" not in server_env and determine_local_world_size(args.nproc_per_node) > 1:
        server_env["OMP_NUM_THREADS"] = "1"
    return ForkServer(os.getpid(), server_env)


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Parse ``argv`` like torchrun, launch through torch.distributed.elastic, return the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import determine_local_world_size
    from torch.distributed.run import run as torch_run

    from launchers.memory_tier import start_pod_memory
    from launchers.restarts import install_restart_policy
    from launchers.standalone import use_standalone_rendezvous
    from trainkit.comms import CommsPlanError, apply_plan
    from trainkit.k8s.rendezvous import RendezvousConfigError
    from trainkit.k8s.signed_state import require_job_token
    from trainkit.metrics.exporter import start_pod_exporter

    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    explicit = explicit_options(parser, argv, env)
    for note in apply_trainkit_defaults(parser, args, explicit, env):
        print(f"trainkit-run: {note}", file=sys.stderr, flush=True)

    if args.rdzv_backend == "k8s":
        try:
            require_job_token(env)  # before any pod waits on DNS for a launcher that cannot start
        except ValueError as error:
            print(f"trainkit-run: {error}", file=sys.stderr, flush=True)
            return 2
    use_standalone_rendezvous(args)

    # Workers inherit this process's environment: the comms plan, the metrics directory and the
    # exit-status directory reach them that way, exactly as torchrun passes its own variables.
    try:
        plan = apply_plan(os.environ)
    except CommsPlanError as error:
        print(f"trainkit-run: {error}", file=sys.stderr, flush=True)
        return 2
    exported = plan.to_export()
    if exported:
        summary = " ".join(f"{name}={value}" for name, value in exported.items())
        print(
            f"trainkit-run: comms plan: {summary} (`trainkit doctor` explains)",
            file=sys.stderr,
            flush=True,
        )

    try:
        exporter = start_pod_exporter(args.metrics_port, env, host_flag=args.metrics_host)
    except (OSError, ValueError) as error:
        print(f"trainkit-run: {error}", file=sys.stderr, flush=True)
        return 2
    if exporter is not None:
        os.environ.update(exporter.worker_env())

    # Memory-first checkpoints: a /dev/shm directory that outlives worker restarts (removed when
    # the job ends) and, with a job token, the peer-replica server on the pod IP.
    try:
        pod_memory = start_pod_memory(args.rdzv_id, env)
    except (OSError, ValueError) as error:
        print(f"trainkit-run: memory checkpoints: {error}", file=sys.stderr, flush=True)
        if exporter is not None:
            exporter.close()
        return 2
    os.environ.update(pod_memory.worker_env())

    # torch's shared agent store outlives a worker-group restart, so a script that calls
    # init_process_group itself can read the previous attempt's gloo addresses and fail or hang.
    # Without sharing, every rendezvous round hands workers a fresh store; an explicit value wins.
    os.environ.setdefault(SHARED_STORE_VARIABLE, "1")
    get_error_handler().initialize()
    status_dir = Path(tempfile.mkdtemp(prefix="trainkit-exit-"))
    os.environ[EXIT_STATUS_DIR_VARIABLE] = str(status_dir)
    # Last, with the workers' environment complete: the fork server imports while torch's agent
    # forms the rendezvous (a worker started before it listens runs the usual way).
    fork_server: ForkServer | None = None
    if args.fork_workers and not args.run_path and not args.no_python:
        fork_server = _start_fork_server(args)
    bind_workers_to_launcher(
        args, os.getpid(), fork_server=None if fork_server is None else fork_server.socket_path
    )
    install_restart_policy(status_dir)  # a broken group is stopped in seconds, not the grace period
    try:
        torch_run(args)
        return 0
    except ChildFailedError as error:
        return _summarise_failure(error)
    except RendezvousConfigError as error:
        print(f"trainkit-run: {error}", file=sys.stderr, flush=True)
        return 2
    except RendezvousError as error:
        print(
            f"trainkit-run: rendezvous failed ({type(error).__name__}): {error}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except SignalException as error:
        # torch's handler is still installed: a second signal would raise again during cleanup.
        for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        return _exit_after_signal(
            error.sigval, status_dir, determine_local_world_size(args.nproc_per_node)
        )
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
        pod_memory.close()
        if exporter is not None:
            exporter.close()
        if fork_server is not None:
            fork_server.close()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
