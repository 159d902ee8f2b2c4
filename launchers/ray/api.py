"""``run()``: a training script, module or function on a Ray cluster through Ray Train.

The driver side only: validate, connect, start Ray Train with the trainkit backend, turn SIGTERM
into a stop request and the workers' exits into trainkit-run's exit codes. Workers run elsewhere.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launchers.ray.env import forwarded_variables
from launchers.run import resolve_exit_code
from trainkit.exit_codes import EXIT_PREEMPTED, describe_exit_code, read_grace_period_s

__all__ = ["DEFAULT_GRACE_PERIOD_S", "DEFAULT_START_TIMEOUT_S", "LaunchResult", "run"]

#: Seconds from the stop request to SIGKILL when neither the caller nor TRAINKIT_GRACE_PERIOD_S says.
DEFAULT_GRACE_PERIOD_S = 30.0
#: Seconds to wait for Ray to place the first worker group before giving up with the numbers.
DEFAULT_START_TIMEOUT_S = 600.0
# After the grace period, how long the driver still waits for Ray Train to wind the run down.
_WIND_DOWN_S = 30.0


@dataclass(frozen=True)
class LaunchResult:
    """How a launch ended.

    ``exit_code`` means what trainkit-run's does: 0 success, 75 (``EXIT_PREEMPTED``) every worker
    saved an agreed checkpoint after a stop, 128+N stopped by signal N, 1 (or a code trainkit
    reserves) a worker failed after the restarts ran out. ``return_values`` holds a function
    target's return value per rank (None for scripts and modules, or when the run failed).
    """

    exit_code: int
    restarts: int
    return_values: list[Any] | None = None
    message: str = ""


def _validate(
    target: str | Callable[..., Any],
    *,
    module: bool,
    num_workers: int,
    max_failures: int,
    grace_period_s: float | None,
    start_timeout_s: float,
    resources_per_worker: Mapping[str, float] | None,
) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r}: must be a whole number of 1 or more")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ValueError(f"max_failures={max_failures!r}: must be a whole number of 0 or more")
    if grace_period_s is not None and grace_period_s < 0:
        raise ValueError(f"grace_period_s={grace_period_s!r}: must be 0 or more seconds")
    if not start_timeout_s > 0:
        raise ValueError(f"start_timeout_s={start_timeout_s!r}: must be more than 0 seconds")
    for name, amount in (resources_per_worker or {}).items():
        if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
            raise ValueError(
                f"resources_per_worker[{name!r}]={amount!r}: must be a number of 0 or more"
            )
    if callable(target):
        if module:
            raise ValueError("module=True needs a module name, not a function")
        return
    if not isinstance(target, str) or not target:
        raise ValueError(
            f"target {target!r}: expected a script path, a module name (module=True) or a function"
        )
    if not module and not Path(target).is_file():
        raise ValueError(
            f"training script {target!r} does not exist (looked in {os.getcwd()}); "
            "pass module=True (-m) for a module"
        )


def _target_spec(
    target: str | Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], module: bool
) -> dict[str, Any]:
    if callable(target):
        from ray import cloudpickle

        return {"kind": "function", "payload": cloudpickle.dumps((target, tuple(args), kwargs))}
    path = target if module else str(Path(target).resolve())
    return {"kind": "module" if module else "script", "name": path, "args": [str(a) for a in args]}


class StartTimeoutError(RuntimeError):
    """Ray did not place the worker group in time (the cluster is too small or busy)."""


def _wait(
    thread: threading.Thread, control: Any, grace_period_s: float, start_timeout_s: float
) -> int | None:
    """Wait for the run; on SIGTERM/SIGINT ask the workers to stop. Returns the signal, if any.

    Raises ``StartTimeoutError`` when no worker group started within ``start_timeout_s``: Ray
    waits for resources forever on a cluster without an autoscaler configuration.
    """
    import ray

    received: list[int] = []
    start_by: float | None = time.monotonic() + start_timeout_s

    def on_signal(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            control.request_stop.remote()

    handled = (signal.SIGTERM, signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in handled} if in_main else {}
    try:
        deadline = None
        while thread.is_alive():
            thread.join(timeout=0.2)
            if received and deadline is None:
                print(
                    f"trainkit-ray: got {signal.Signals(received[0]).name}; asking every worker to "
                    f"save and stop within {grace_period_s:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                deadline = time.monotonic() + grace_period_s + _WIND_DOWN_S
            if deadline is not None and time.monotonic() > deadline:
                break
            if start_by is not None and time.monotonic() > start_by and not received:
                if ray.get(control.summary.remote())[0] >= 0:
                    start_by = None
                else:
                    raise StartTimeoutError(f"no worker group started within {start_timeout_s:g} s")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return received[0] if received else None


def run(
    target: str | Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    kwargs: Mapping[str, Any] | None = None,
    num_workers: int,
    module: bool = False,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    max_failures: int = 0,
    run_id: str | None = None,
    env: Mapping[str, str] | None = None,
    metrics_port: int | None = None,
    grace_period_s: float | None = None,
    address: str | None = None,
    storage: str | None = None,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    connect_timeout_s: float = 10.0,
) -> LaunchResult:
    """Run ``target`` on ``num_workers`` Ray Train workers, each with torchrun's environment.

    Args:
        target: a script path, a module name (``module=True``) or a picklable function; a function
            runs as ``target(*args, **kwargs)`` in its own process and its return values come back.
        args: command-line arguments of a script or module; positional arguments of a function.
        num_workers: training processes (Ray Train workers), one CPU each unless
            ``resources_per_worker`` or ``use_gpu`` say otherwise.
        use_gpu: one GPU per worker; workers on a node see all its GPUs, as under torchrun.
        max_failures: failures after which the whole group is restarted (Ray Train's
            ``FailureConfig.max_failures``); restarted processes resume from their committed
            checkpoints. ``TORCHELASTIC_MAX_RESTARTS`` is set to it.
        run_id: ``TORCHELASTIC_RUN_ID`` and the Ray Train run name (default: a fresh id).
        env: variables for every worker, on top of the forwarded ``TRAINKIT_*``, ``NCCL_*``,
            ``GLOO_*``, ``TORCH_*`` and ``OMP_NUM_THREADS`` of this process.
        metrics_port: per-node ``/metrics`` port as trainkit-run's ``--metrics-port`` (default:
            ``TRAINKIT_METRICS_PORT``, else 9400 inside a Kubernetes pod, else off).
        grace_period_s: seconds from a stop request (SIGTERM to this process) to SIGKILL (default
            ``TRAINKIT_GRACE_PERIOD_S``, else 30).
        address: ``auto`` (default: ``RAY_ADDRESS``, else a cluster started on this machine),
            ``host:port`` of the head, ``ray://host:port`` (Ray Client) or ``local`` (start one).
            An address that does not answer within ``connect_timeout_s`` raises ``ConnectionError``.
        storage: Ray Train's run storage, a path or URL every node reaches (default
            ``~/ray_results``); the script's checkpoints go where its ``CheckpointManager`` says.
        start_timeout_s: give up (exit code 1) when Ray has not placed the workers by then.

    SIGTERM or SIGINT to this process (when called from the main thread) asks every training
    process to stop: each gets SIGTERM, saves the agreed checkpoint and exits 75. Connects with
    ``ray.init`` unless Ray is already initialised in this process. Raises ``ValueError`` for bad
    arguments, before contacting Ray.
    """
    _validate(
        target,
        module=module,
        num_workers=num_workers,
        max_failures=max_failures,
        grace_period_s=grace_period_s,
        start_timeout_s=start_timeout_s,
        resources_per_worker=resources_per_worker,
    )
    grace_s = grace_period_s if grace_period_s is not None else read_grace_period_s()
    grace_s = DEFAULT_GRACE_PERIOD_S if grace_s is None else grace_s
    if run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", run_id):
        raise ValueError(
            f"run_id={run_id!r}: use letters, digits, '.', '_' and '-' (at most 100, starting "
            "with a letter or digit); it names files and the Ray Train run"
        )
    run_id = run_id or f"trainkit-{uuid.uuid4().hex[:12]}"
    forwarded = {**forwarded_variables(os.environ), **dict(env or {})}
    spec = _target_spec(target, args, kwargs or {}, module)

    try:
        import ray
    except ImportError:
        raise ValueError(
            "trainkit-ray needs Ray Train, which is not installed in this Python "
            f"({sys.executable}); install the extra: pip install 'trainkit[ray]'"
        ) from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a launcher never phones home
    # The trainer, its configs and the backend hooks used here are Ray Train V2's (Ray's default).
    if os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1") != "1":
        raise ValueError(
            f"RAY_TRAIN_V2_ENABLED={os.environ['RAY_TRAIN_V2_ENABLED']!r}: trainkit-ray runs on Ray "
            "Train V2; unset the variable (or set it to 1)"
        )
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from launchers.ray.control import RunControl
    from launchers.ray.worker import TrainkitBackendConfig, run_worker

    started_ray = not ray.is_initialized()
    if started_ray:
        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        _check_reachable(address, connect_timeout_s)
        ray.init(address=None if address == "local" else address, log_to_driver=True)
    control = ray.remote(num_cpus=0)(RunControl).remote()
    try:
        trainer = DataParallelTrainer(
            run_worker,
            train_loop_config={
                "control": control,
                "target": spec,
                "forwarded": forwarded,
                "max_failures": max_failures,
                "run_id": run_id,
                "grace_period_s": grace_s,
                "cwd": os.getcwd(),
            },
            backend_config=TrainkitBackendConfig(
                control=control, metrics_port=metrics_port, forwarded=forwarded
            ),
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=use_gpu,
                resources_per_worker=dict(resources_per_worker) if resources_per_worker else None,
            ),
            run_config=RunConfig(
                name=run_id,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        outcome: list[BaseException | None] = []

        def fit() -> None:
            try:
                trainer.fit()
                outcome.append(None)
            except BaseException as error:  # reported by the driver thread below
                outcome.append(error)

        thread = threading.Thread(target=fit, name="trainkit-ray-fit", daemon=True)
        thread.start()
        try:
            signum = _wait(thread, control, grace_s, start_timeout_s)
        except StartTimeoutError as error:
            needed = dict(resources_per_worker or {"CPU": 1, **({"GPU": 1} if use_gpu else {})})
            message = (
                f"{error}: {num_workers} workers x {needed} do not fit the cluster's resources "
                f"{_rounded(ray.cluster_resources())} (free now: "
                f"{_rounded(ray.available_resources())}); lower --num-workers or "
                "--resources-per-worker, add nodes, or raise --start-timeout-s"
            )
            return LaunchResult(1, 0, message=message)
        attempt, _, exits = ray.get(control.summary.remote())
        return _result(signum, outcome, attempt, exits, num_workers, spec["kind"] == "function")
    finally:
        ray.kill(control)
        if started_ray:
            ray.shutdown()


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast on a head that does not answer: ``ray.init`` would retry for minutes."""
    if address in {"auto", "local"}:
        return  # found through this machine's Ray session files, or started here
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(
            f"Ray head {address} does not answer within {timeout_s:g} s ({error})"
        ) from None


def _rounded(resources: Mapping[str, float]) -> dict[str, float]:
    return {
        name: round(amount, 2)
        for name, amount in sorted(resources.items())
        if name in {"CPU", "GPU", "memory"} or not name.startswith(("node:", "object_store"))
    }


def _result(
    signum: int | None,
    outcome: list[BaseException | None],
    attempt: int,
    exits: dict[int, Any],
    num_workers: int,
    is_function: bool,
) -> LaunchResult:
    restarts = max(attempt, 0)
    if signum is not None:
        codes = {rank: exit.code for rank, exit in exits.items()}
        if len(codes) == num_workers and set(codes.values()) == {EXIT_PREEMPTED}:
            message = (
                f"got {signal.Signals(signum).name}; all {num_workers} workers saved an agreed "
                f"checkpoint and exited {EXIT_PREEMPTED} (preempted)"
            )
            return LaunchResult(EXIT_PREEMPTED, restarts, message=message)
        return LaunchResult(
            128 + signum, restarts, message=f"stopped by {signal.Signals(signum).name}"
        )
    error = outcome[0] if outcome else None
    if error is None and outcome:
        values = None
        if is_function:
            from ray import cloudpickle

            values = [
                cloudpickle.loads(exits[r].value) if r in exits and exits[r].value else None
                for r in range(num_workers)
            ]
        return LaunchResult(0, restarts, values, message="all workers succeeded")
    failures = {rank: exit for rank, exit in exits.items() if exit.code != 0}
    if not failures:
        return LaunchResult(1, restarts, message=f"the run failed before training started: {error}")
    first = min(failures.values(), key=lambda exit: exit.unix_s)
    code = resolve_exit_code({rank: exit.code for rank, exit in failures.items()}, first.rank)
    message = (
        f"worker rank {first.rank} failed first with exit code {first.code} "
        f"({describe_exit_code(first.code)}) after {restarts} restart(s); {len(failures)} "
        f"worker(s) failed; launcher exits {code}"
    )
    if first.error:
        message += f"\nroot cause (rank {first.rank}): {first.error}"
    return LaunchResult(code, restarts, message=message)
