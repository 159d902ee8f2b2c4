"""Compatibility name for the exit codes of the preemption contract; see ``trainkit.preemption``."""

from __future__ import annotations

from trainkit.preemption import (
    EXIT_PREEMPTED,
    EXIT_STATUS_DIR_VARIABLE,
    GRACE_PERIOD_VARIABLE,
    RESERVED_EXIT_CODES,
    describe_exit_code,
    read_grace_period_s,
    record_worker_exit,
)

__all__ = [
    "EXIT_PREEMPTED",
    "EXIT_STATUS_DIR_VARIABLE",
    "GRACE_PERIOD_VARIABLE",
    "RESERVED_EXIT_CODES",
    "describe_exit_code",
    "read_grace_period_s",
    "record_worker_exit",
]
