"""The per-worker recorder: a few float stores into this worker's shared slot per training step.

It must stay cheap enough to call every step (a couple of microseconds) and never blocks, sleeps,
allocates per call or talks to the network; serving is the agent's job (``exporter``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Mapping
from pathlib import Path

from trainkit.metrics.slots import CHECKPOINT_BUCKETS_S, STEP_BUCKETS_S, Field, open_slot
from trainkit.world import World

# Module constants rather than Field.X lookups: step() runs every training step.
_monotonic = time.monotonic
_bisect_left = bisect_left
_SAMPLES, _TOKENS, _LOSS = Field.SAMPLES, Field.TOKENS, Field.LOSS
_LAST_STEP_MONOTONIC_S, _STEP_SUM_S, _STEP_BUCKETS = (
    Field.LAST_STEP_MONOTONIC_S,
    Field.STEP_SUM_S,
    Field.STEP_BUCKETS,
)
_STALL_S, _PRODUCTIVE_S = Field.STALL_S, Field.PRODUCTIVE_S

__all__ = [
    "METRICS_DIR_VARIABLE",
    "METRICS_PORT_VARIABLE",
    "DisabledRecorder",
    "Recorder",
    "local_metrics_dir",
    "recorder_from_env",
]

#: Set by trainkit-run for its workers: the directory of slots that the agent's exporter reads.
METRICS_DIR_VARIABLE = "TRAINKIT_METRICS_DIR"
#: The pod's metrics port; without trainkit-run, local rank 0 serves it (0 or unset: disabled).
METRICS_PORT_VARIABLE = "TRAINKIT_METRICS_PORT"


class Recorder:
    """Records one worker's training events into its slot in ``directory``.

    Step duration is the time between consecutive ``step`` calls; the first call after a (re)start
    only sets the clock. Productive time is each step interval minus the data wait and checkpoint
    blocking reported inside it, so goodput counts start-up, restarts and stalls as lost time.
    """

    enabled = True

    def __init__(self, directory: str | os.PathLike[str], world: World) -> None:
        self.directory = Path(directory)
        self.world = world
        self._mapping, self._fields = open_slot(
            self.directory,
            local_rank=world.local_rank,
            local_world_size=world.local_world_size,
            world_size=world.world_size,
            restart_count=world.restart_count,
            now_unix_s=time.time(),
        )
        fields = self._fields
        # The step path keeps its totals as Python floats and only stores them: cheaper than
        # read-modify-write through the shared mapping. A restarted worker continues the totals.
        self._samples = fields[_SAMPLES]
        self._tokens = fields[_TOKENS]
        self._step_sum_s = fields[_STEP_SUM_S]
        self._productive_s = fields[_PRODUCTIVE_S]
        self._stalls_seen_s = fields[_STALL_S]
        self._last_step_s: float | None = None

    def step(self, samples: int, tokens: int | None = None, loss: float | None = None) -> None:
        now = _monotonic()
        fields = self._fields
        self._samples += samples
        fields[_SAMPLES] = self._samples
        if tokens is not None:
            self._tokens += tokens
            fields[_TOKENS] = self._tokens
        if loss is not None:
            fields[_LOSS] = loss
        fields[_LAST_STEP_MONOTONIC_S] = now
        last = self._last_step_s
        self._last_step_s = now
        if last is None:
            return
        interval = now - last
        self._step_sum_s += interval
        fields[_STEP_SUM_S] = self._step_sum_s
        fields[_STEP_BUCKETS + _bisect_left(STEP_BUCKETS_S, interval)] += 1
        # Observers only ever add to STALL_S, so reading it here needs no lock even when a
        # checkpoint thread reports concurrently.
        stalls = fields[_STALL_S]
        productive = interval - (stalls - self._stalls_seen_s)
        self._stalls_seen_s = stalls
        if productive > 0.0:
            self._productive_s += productive
            fields[_PRODUCTIVE_S] = self._productive_s

    def observe_data_wait(self, seconds: float) -> None:
        fields = self._fields
        fields[Field.DATA_WAIT_S] += seconds
        fields[_STALL_S] += seconds

    def observe_checkpoint(self, blocking_s: float, total_s: float) -> None:
        fields = self._fields
        fields[Field.CKPT_BLOCKING_SUM_S] += blocking_s
        fields[Field.CKPT_BLOCKING_COUNT] += 1
        fields[Field.CKPT_BLOCKING_BUCKETS + _bisect_left(CHECKPOINT_BUCKETS_S, blocking_s)] += 1
        fields[Field.CKPT_TOTAL_SUM_S] += total_s
        fields[Field.CKPT_TOTAL_COUNT] += 1
        fields[Field.CKPT_TOTAL_BUCKETS + _bisect_left(CHECKPOINT_BUCKETS_S, total_s)] += 1
        fields[_STALL_S] += blocking_s

    def close(self) -> None:
        """Unmap the slot; the file stays for the agent (and for this rank's next incarnation)."""
        fields, self._fields = self._fields, None  # type: ignore[assignment]
        if fields is not None:
            fields.release()
            self._mapping.close()


class DisabledRecorder:
    """What the module-level functions call when metrics are not configured: does nothing."""

    enabled = False

    def step(self, samples: int, tokens: int | None = None, loss: float | None = None) -> None:
        pass

    def observe_data_wait(self, seconds: float) -> None:
        pass

    def observe_checkpoint(self, blocking_s: float, total_s: float) -> None:
        pass

    def close(self) -> None:
        pass


def _parse_port(env: Mapping[str, str]) -> int:
    raw = env.get(METRICS_PORT_VARIABLE, "").strip()
    if raw == "":
        return 0
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(
            f"{METRICS_PORT_VARIABLE}={raw!r} is not a port number; set 1..65535, or 0 to disable metrics"
        ) from None
    if not 0 <= port < 65536:
        raise ValueError(
            f"{METRICS_PORT_VARIABLE}={raw!r} must be in 0..65535 (0 disables metrics)"
        )
    return port


def _shared_memory_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def local_metrics_dir(port: int, run_id: str) -> Path:
    """Where workers without trainkit-run keep their slots: one directory per (user, port, run)."""
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return _shared_memory_root() / f"trainkit-metrics-{getpass.getuser()}-p{port}-{safe_run}"


def _remove_other_runs(current: Path) -> None:
    # Only one run can hold the port at a time, so older runs' directories for it are stale.
    prefix = current.name.rsplit("-", 1)[0] + "-"
    for other in current.parent.glob(f"{prefix}*"):
        if other != current and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def recorder_from_env(env: Mapping[str, str] | None = None) -> Recorder | DisabledRecorder:
    """The recorder this process should use, as the environment says.

    ``TRAINKIT_METRICS_DIR`` (set by trainkit-run): record into the agent's directory.
    Else ``TRAINKIT_METRICS_PORT`` > 0 (no launcher, e.g. plain torchrun or ``python train.py``):
    record into ``local_metrics_dir`` and, on local rank 0, serve ``/metrics`` from this process.
    Else metrics are off and every call is a no-op.
    """
    env = os.environ if env is None else env
    world = World.from_env(env)
    directory = env.get(METRICS_DIR_VARIABLE, "")
    if directory:
        if not os.path.isdir(directory):
            print(
                f"trainkit metrics: {METRICS_DIR_VARIABLE}={directory} does not exist (the launcher's "
                "exporter is gone?); metrics are off in this worker",
                file=sys.stderr,
            )
            return DisabledRecorder()
        return Recorder(directory, world)
    port = _parse_port(env)
    if port == 0:
        return DisabledRecorder()
    local_dir = local_metrics_dir(port, world.run_id)
    local_dir.mkdir(parents=True, exist_ok=True)
    if world.local_rank == 0:
        from trainkit.metrics.exporter import serve_in_worker

        _remove_other_runs(local_dir)
        serve_in_worker(local_dir, port, env=env)
    return Recorder(local_dir, world)
