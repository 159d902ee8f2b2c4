"""What runs inside Ray Train's worker actors: the backend that prepares each attempt and the loop
that starts one training process with torchrun's environment, supervises it and reports its exit.

The actor plays torchrun's agent: it hosts the store (rank 0), serves the node's ``/metrics`` (lowest
rank on a node), forwards the stop request as SIGTERM. The process group is created by the training
process itself (``trainkit.init()`` or plain ``init_process_group``), never here.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train.backend import Backend, BackendConfig

from launchers.ray.env import WorkerPlace, torchrun_worker_env
from trainkit.exit_codes import EXIT_STATUS_DIR_VARIABLE, describe_exit_code

__all__ = ["TrainkitBackendConfig", "WorkerExitError", "run_worker"]

_POLL_S = 0.5
_STOP_POLL_S = 30.0
# Variables a Ray worker may carry from Ray Train or an earlier launcher that must not leak into a
# torchrun environment (they would make World.from_env read the wrong source).
_STALE_VARIABLES = {"NODE_RANK", "ACCELERATE_TORCH_DEVICE", "TORCHELASTIC_ERROR_FILE"}


class WorkerExitError(RuntimeError):
    """A training process exited with a failure; Ray Train restarts the group if restarts remain."""


@dataclass(frozen=True)
class _AttemptFacts:
    attempt: int
    master_addr: str
    master_port: int
    num_nodes: int
    node_env: dict[str, str]


# Per actor process: set by the backend before training starts, read by run_worker.
_facts: _AttemptFacts | None = None
_store: Any = None
_exporter: Any = None
# The training process and its directory, while run_worker supervises them.
_process: subprocess.Popen[bytes] | None = None
_workdir: Path | None = None


def _host_agent_store() -> tuple[str, int]:
    """Rank 0's actor hosts the attempt's TCPStore, as torchrun's agent does for its workers."""
    global _store
    import ray
    import torch.distributed as dist

    addr = ray.util.get_node_ip_address()
    _store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False)
    return addr, _store.port


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _start_node_exporter(metrics_port: int | None, forwarded: dict[str, str]) -> dict[str, str]:
    """Serve this node's ``/metrics`` like trainkit-run's agent; returns the workers' variables."""
    global _exporter
    from trainkit.metrics.exporter import start_pod_exporter

    _exporter = start_pod_exporter(metrics_port, {**os.environ, **forwarded})
    return {} if _exporter is None else _exporter.worker_env()


def _set_facts(facts: _AttemptFacts) -> None:
    global _facts
    _facts = facts


def _release() -> None:
    """End of an attempt (success, failure or stop): nothing of it may outlive the group.

    Ray Train calls this before it kills the actors; after a peer's crash this actor's training
    process may still be blocked in a collective, and a SIGKILLed actor runs no ``finally``.
    """
    global _store, _exporter
    process, workdir = _process, _workdir
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    if _exporter is not None:
        _exporter.close()
    _store = _exporter = None


class TrainkitBackendConfig(BackendConfig):
    """Ray Train backend settings: the run's control actor and what every node is given."""

    def __init__(
        self, *, control: Any, metrics_port: int | None, forwarded: dict[str, str]
    ) -> None:
        self.control = control
        self.metrics_port = metrics_port
        self.forwarded = forwarded

    @property
    def backend_cls(self) -> type[Backend]:
        return TrainkitBackend


class TrainkitBackend(Backend):
    """Prepares each attempt: its number, the agent store, per-node metrics; no process group."""

    # As torchrun: a node's workers all see the node's GPUs and pick theirs by LOCAL_RANK.
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: TrainkitBackendConfig) -> None:
        import ray

        attempt = ray.get(backend_config.control.begin_attempt.remote())
        master_addr, master_port = worker_group.execute_single(0, _host_agent_store)
        node_ids = worker_group.execute(_node_id)
        node_env: dict[str, dict[str, str]] = {}
        for rank, node in enumerate(node_ids):
            if node not in node_env:  # ranks are contiguous per node: this is local rank 0
                node_env[node] = worker_group.execute_single(
                    rank,
                    _start_node_exporter,
                    backend_config.metrics_port,
                    backend_config.forwarded,
                )
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _set_facts,
                    _AttemptFacts(attempt, master_addr, master_port, len(node_env), node_env[node]),
                )
                for rank, node in enumerate(node_ids)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: TrainkitBackendConfig) -> None:
        worker_group.execute(_release)


def _die_with_parent() -> None:
    # The training process must not outlive this actor when Ray kills it (a peer failed, the run
    # ended): PR_SET_PDEATHSIG asks Linux to SIGKILL the child then.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)


def _command(target: dict[str, Any], workdir: Path) -> list[str]:
    if target["kind"] == "function":
        payload = workdir / "function.pkl"
        payload.write_bytes(target["payload"])
        return [
            sys.executable,
            "-u",
            "-m",
            "launchers.ray.child",
            str(payload),
            str(workdir / "result.pkl"),
        ]
    if target["kind"] == "module":
        return [sys.executable, "-u", "-m", target["name"], *target["args"]]
    return [sys.executable, "-u", target["name"], *target["args"]]


def _error_summary(error_file: Path) -> str | None:
    """The root cause torch's ``@record`` wrote, as torchrun would print it."""
    try:
        record = json.loads(error_file.read_text())
    except (OSError, ValueError):
        return None
    message = record.get("message", record)
    if isinstance(message, dict):
        message = message.get("message", json.dumps(message))
    return str(message)[-2000:]


def _stop_requested(control: Any) -> bool:
    import ray

    try:
        return bool(ray.get(control.stop_requested.remote(), timeout=5))
    except Exception:  # an unreachable control actor must not kill training; ask again later
        return False


def _forward_stop(process: subprocess.Popen[bytes], control: Any, seen: threading.Event) -> None:
    """Long-poll the control actor; SIGTERM the training process the moment a stop is asked."""
    import ray

    while process.poll() is None:
        try:
            if ray.get(control.wait_for_stop.remote(_STOP_POLL_S), timeout=_STOP_POLL_S + 30):
                seen.set()
                process.send_signal(signal.SIGTERM)
                return
        except Exception:  # an unreachable control actor must not kill training; ask again
            time.sleep(_POLL_S)


def _supervise(process: subprocess.Popen[bytes], control: Any, grace_period_s: float) -> bool:
    """Wait for the process; forward a stop request as SIGTERM. Returns whether a stop came."""
    seen = threading.Event()
    threading.Thread(
        target=_forward_stop, args=(process, control, seen), name="trainkit-stop", daemon=True
    ).start()
    kill_at = None
    while True:
        try:
            process.wait(timeout=_POLL_S)
            return seen.is_set()
        except subprocess.TimeoutExpired:
            pass
        if seen.is_set():
            kill_at = kill_at or time.monotonic() + grace_period_s
            if time.monotonic() > kill_at:
                os.killpg(process.pid, signal.SIGKILL)


def run_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: one training process with torchrun's environment."""
    global _process, _workdir
    import ray.train

    from trainkit.comms import CommsPlanError, apply_plan

    facts, control = _facts, config["control"]
    assert facts is not None, "the trainkit backend sets the attempt's facts before training starts"
    context = ray.train.get_context()
    place = WorkerPlace(
        rank=context.get_world_rank(),
        local_rank=context.get_local_rank(),
        world_size=context.get_world_size(),
        local_world_size=context.get_local_world_size(),
        node_rank=context.get_node_rank(),
        num_nodes=facts.num_nodes,
        master_addr=facts.master_addr,
        master_port=facts.master_port,
        restart_count=facts.attempt,
        max_restarts=config["max_failures"],
        run_id=config["run_id"],
    )
    # Directories of earlier attempts of this run on this node belong to dead actors (Ray Train
    # restarts the whole group), some SIGKILLed before they could clean up: remove them.
    run_prefix = f"trainkit-ray-{place.run_id}-attempt"
    for stale in Path(tempfile.gettempdir()).glob(f"{run_prefix}*"):
        attempt = stale.name.removeprefix(run_prefix).split("-", 1)[0]
        if attempt.isdigit() and int(attempt) < facts.attempt:
            shutil.rmtree(stale, ignore_errors=True)
    workdir = _workdir = Path(
        tempfile.mkdtemp(prefix=f"{run_prefix}{facts.attempt}-rank{place.rank}-")
    )
    error_file = workdir / "error.json"
    env = {key: value for key, value in os.environ.items() if key not in _STALE_VARIABLES}
    env.update(config["forwarded"])
    env.update(facts.node_env)
    env.update(
        torchrun_worker_env(place, error_file=str(error_file), driver_env=config["forwarded"])
    )
    env[EXIT_STATUS_DIR_VARIABLE] = str(workdir / "exit")
    os.makedirs(env[EXIT_STATUS_DIR_VARIABLE])

    def report(code: int, error: str | None, value: bytes | None = None) -> None:
        import ray

        ray.get(control.report_exit.remote(facts.attempt, place.rank, code, error, value))

    try:
        try:
            apply_plan(env)  # the node's NCCL/RDMA plan, as trainkit-run applies it before workers
        except CommsPlanError as error:
            report(2, str(error))
            raise WorkerExitError(f"rank {place.rank}: {error}") from None
        if _stop_requested(control):
            return  # stopped before this attempt's process started: nothing to save
        cwd = config["cwd"] if os.path.isdir(config["cwd"]) else None
        process = _process = subprocess.Popen(
            _command(config["target"], workdir),
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            stopped = _supervise(process, control, config["grace_period_s"])
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        code = process.returncode
        # A peer's agreed preemption save stops this process too, possibly before this actor has
        # seen the stop request itself: ask again before calling a non-zero exit a failure.
        stopped = stopped or (code != 0 and _stop_requested(control))
        result = workdir / "result.pkl"
        value = result.read_bytes() if code == 0 and result.exists() else None
        error = None if code == 0 else _error_summary(error_file)
        report(code, error, value)
        if code != 0 and not stopped:
            raise WorkerExitError(
                f"rank {place.rank} (local rank {place.local_rank}, attempt {facts.attempt}) "
                f"exited with code {code} ({describe_exit_code(code)})"
                + (f": {error}" if error else "")
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
