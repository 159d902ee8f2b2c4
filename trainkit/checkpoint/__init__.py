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
from trainkit.checkpoint.export import (
    NoCommittedStepError,
    export_checkpoint,
    load_full_state_dict,
)
from trainkit.checkpoint.manager import GRACE_PERIOD_VARIABLE, CheckpointManager, exit_preempted
from trainkit.checkpoint.train_state import TrainState
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
    "NoCommittedStepError",
    "TrainState",
    "UnsupportedCheckpointError",
    "exit_preempted",
    "export_checkpoint",
    "load_full_state_dict",
]
