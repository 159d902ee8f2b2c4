"""The per-worker recorder: a few float stores into this worker's shared slot per training step.

It must stay cheap enough to call every step (a couple of microseconds) and never blocks, sleeps,
allocates per call or talks to the network; serving is the agent's job (``exporter``).
"""

from __future__ import annotations

import os
import sys
import time
from bisect import bisect_left
from collections.abc import Mapping
from pathlib import Path

from trainkit.metrics.directories import (
    local_metrics_dir,
    make_private_directory,
    remove_other_runs,
)
from trainkit.metrics.settings import (
    METRICS_DIR_VARIABLE,
    METRICS_PORT_VARIABLE,
    parse_metrics_port,
)
from trainkit.metrics.slots import (
    CHECKPOINT_BUCKETS_S,
    STEP_BUCKETS_S,
    TIER_OPERATIONS,
    Field,
    open_slot,
)
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


def _refuse_increment(call: str, **values: float | None) -> None:
    """Raise for the first value that is negative or NaN: a counter that went down would read as
    a reset to Prometheus (and a NaN would poison the pod's sum until the slot is deleted)."""
    for name, value in values.items():
        if value is not None and not value >= 0:
            raise ValueError(
                f"trainkit.metrics.{call}({name}={value!r}): must be a number >= 0, since it "
                "adds to a counter that never goes down; pass what this step consumed or waited"
            )


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
        if not samples >= 0 or (tokens is not None and not tokens >= 0):
            _refuse_increment("step", samples=samples, tokens=tokens)
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
        if not seconds >= 0:
            _refuse_increment("observe_data_wait", seconds=seconds)
        fields = self._fields
        fields[Field.DATA_WAIT_S] += seconds
        fields[_STALL_S] += seconds

    def observe_checkpoint(self, blocking_s: float, total_s: float) -> None:
        if not (blocking_s >= 0 and total_s >= 0):
            _refuse_increment("observe_checkpoint", blocking_s=blocking_s, total_s=total_s)
        fields = self._fields
        fields[Field.CKPT_BLOCKING_SUM_S] += blocking_s
        fields[Field.CKPT_BLOCKING_COUNT] += 1
        fields[Field.CKPT_BLOCKING_BUCKETS + _bisect_left(CHECKPOINT_BUCKETS_S, blocking_s)] += 1
        fields[Field.CKPT_TOTAL_SUM_S] += total_s
        fields[Field.CKPT_TOTAL_COUNT] += 1
        fields[Field.CKPT_TOTAL_BUCKETS + _bisect_left(CHECKPOINT_BUCKETS_S, total_s)] += 1
        fields[_STALL_S] += blocking_s

    def observe_checkpoint_tier(
        self,
        tier: str,
        operation: str,
        *,
        num_bytes: int,
        seconds: float,
        lag_steps: int | None = None,
    ) -> None:
        index = _tier_operation_index(tier, operation)
        if not (num_bytes >= 0 and seconds >= 0):
            _refuse_increment("observe_checkpoint_tier", num_bytes=num_bytes, seconds=seconds)
        fields = self._fields
        first = Field.TIER_FIELDS + 3 * index
        fields[first] += 1
        fields[first + 1] += num_bytes
        fields[first + 2] += seconds
        if lag_steps is not None and lag_steps >= 0:
            fields[Field.REPLICATION_LAG_STEPS] = lag_steps

    def close(self) -> None:
        """Unmap the slot; the file stays for the agent (and for this rank's next incarnation)."""
        fields, self._fields = self._fields, None  # type: ignore[assignment]
        if fields is not None:
            fields.release()
            self._mapping.close()


class DisabledRecorder:
    """What the module-level functions call when metrics are not configured: does nothing."""

    enabled = False

    # Checks like the real recorder's, so a bad call fails the same way with metrics off.
    def step(self, samples: int, tokens: int | None = None, loss: float | None = None) -> None:
        if not samples >= 0 or (tokens is not None and not tokens >= 0):
            _refuse_increment("step", samples=samples, tokens=tokens)

    def observe_data_wait(self, seconds: float) -> None:
        if not seconds >= 0:
            _refuse_increment("observe_data_wait", seconds=seconds)

    def observe_checkpoint(self, blocking_s: float, total_s: float) -> None:
        if not (blocking_s >= 0 and total_s >= 0):
            _refuse_increment("observe_checkpoint", blocking_s=blocking_s, total_s=total_s)

    def observe_checkpoint_tier(
        self,
        tier: str,
        operation: str,
        *,
        num_bytes: int,
        seconds: float,
        lag_steps: int | None = None,
    ) -> None:
        _tier_operation_index(tier, operation)
        if not (num_bytes >= 0 and seconds >= 0):
            _refuse_increment("observe_checkpoint_tier", num_bytes=num_bytes, seconds=seconds)

    def close(self) -> None:
        pass


def _tier_operation_index(tier: str, operation: str) -> int:
    try:
        return TIER_OPERATIONS.index((tier, operation))
    except ValueError:
        known = ", ".join(f"{t}/{o}" for t, o in TIER_OPERATIONS)
        raise ValueError(
            f"observe_checkpoint_tier: unknown tier/operation {tier}/{operation} (known: {known})"
        ) from None


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
    port = parse_metrics_port(env)
    if port == 0:
        return DisabledRecorder()
    local_dir = make_private_directory(local_metrics_dir(port, world.run_id))
    if world.local_rank == 0:
        # Imported here: prometheus_client is only needed by the one process that serves.
        from trainkit.metrics.exporter import serve_in_worker

        remove_other_runs(local_dir)
        serve_in_worker(local_dir, port, env=env)
    return Recorder(local_dir, world)
