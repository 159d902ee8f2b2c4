"""Preemption-safe checkpoints: committed-or-invisible steps on any fsspec store, async saves,
saves agreed across ranks after SIGTERM, exact resume. See ``CheckpointManager``.
"""

from trainkit.checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotWritableError,
    CheckpointSaveError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
)
from trainkit.checkpoint.manager import GRACE_PERIOD_VARIABLE, CheckpointManager, exit_preempted
from trainkit.exit_codes import EXIT_PREEMPTED

__all__ = [
    "EXIT_PREEMPTED",
    "GRACE_PERIOD_VARIABLE",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotWritableError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "UnsupportedCheckpointError",
    "exit_preempted",
]
