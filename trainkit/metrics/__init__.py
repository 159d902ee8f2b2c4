"""Training and GPU metrics for Prometheus: cheap per-step recording in workers, one pod endpoint.

Workers call ``step``/``observe_*``; the first call reads the environment once and from then on
each call is a few stores into shared memory (or nothing when metrics are off). Importing this
module starts nothing and imports neither torch nor prometheus_client.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from trainkit.metrics.recorder import DisabledRecorder, Recorder, recorder_from_env
from trainkit.metrics.settings import METRICS_DIR_VARIABLE, METRICS_PORT_VARIABLE

__all__ = [
    "METRICS_DIR_VARIABLE",
    "METRICS_PORT_VARIABLE",
    "configure",
    "observe_checkpoint",
    "observe_checkpoint_tier",
    "observe_data_wait",
    "reset",
    "step",
]

_recorder: Recorder | DisabledRecorder | None = None
_configure_lock = threading.Lock()  # a checkpoint thread may report before the first step


def configure(env: Mapping[str, str] | None = None) -> Recorder | DisabledRecorder:
    """Set up this process's recorder from ``env`` (default ``os.environ``) if not done yet.

    Optional: the first ``step`` does it. Calling it at start-up makes the first step's interval
    (and the goodput clock of this incarnation) begin at start-up rather than at the first step.
    """
    global _recorder
    with _configure_lock:
        if _recorder is None:
            _recorder = recorder_from_env(env)
        return _recorder


def reset() -> None:
    """Forget the recorder (the next call configures again); for tests and forked children."""
    global _recorder
    with _configure_lock:
        recorder, _recorder = _recorder, None
    if recorder is not None:
        recorder.close()


def step(samples: int, tokens: int | None = None, loss: float | None = None) -> None:
    """Record one finished training step of this worker: ``samples`` (and ``tokens``) it consumed.

    ``loss`` (a Python float: pass ``loss.item()`` only when you already synchronise) sets the
    ``trainkit_loss`` gauge. Call once per step, after the optimizer step.
    """
    (_recorder or configure()).step(samples, tokens, loss)


def observe_data_wait(seconds: float) -> None:
    """Add time the training loop spent waiting for its next batch (pass it as ``ShardedLoader(wait_observer=...)``)."""
    (_recorder or configure()).observe_data_wait(seconds)


def observe_checkpoint(blocking_s: float, total_s: float) -> None:
    """Record one checkpoint: time it blocked training and its total time (``CheckpointManager``)."""
    (_recorder or configure()).observe_checkpoint(blocking_s, total_s)


def observe_checkpoint_tier(
    tier: str,
    operation: str,
    *,
    num_bytes: int,
    seconds: float,
    lag_steps: int | None = None,
) -> None:
    """Record one memory-first checkpoint operation (``CheckpointManager`` with memory tiers).

    ``tier``/``operation``: ``memory``/``save`` (the blocking copy of a snapshot), ``peer``/``save``
    (a push to the peer, ``lag_steps`` behind the newest snapshot), ``peer``/``fetch``, and
    ``memory``, ``peer`` or ``storage``/``restore``.
    """
    (_recorder or configure()).observe_checkpoint_tier(
        tier, operation, num_bytes=num_bytes, seconds=seconds, lag_steps=lag_steps
    )
