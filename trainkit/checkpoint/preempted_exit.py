"""Leaving after an agreed preemption in one call: finish every open ``CheckpointManager``'s save,
leave the process group, record the exit for trainkit-run and exit 75.

It tracks open managers only through weak references, and never saves anything itself.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any, NoReturn

from trainkit.preemption import exit_preempted as record_and_exit_preempted

if TYPE_CHECKING:
    from trainkit.checkpoint.manager import CheckpointManager

__all__ = ["exit_preempted", "track_open_manager", "untrack_manager"]

logger = logging.getLogger(__name__)

_open_managers: weakref.WeakSet[Any] = weakref.WeakSet()


def track_open_manager(manager: CheckpointManager) -> None:
    """Remember ``manager`` until it is closed, so ``exit_preempted()`` can close it."""
    _open_managers.add(manager)


def untrack_manager(manager: CheckpointManager) -> None:
    _open_managers.discard(manager)


def exit_preempted(*managers: CheckpointManager) -> NoReturn:
    """Close ``managers`` (default: every open one; each waits for its in-flight save), shut down
    the process group (``trainkit.shutdown()``: every rank calls this), tell trainkit-run the agreed
    step and exit with ``EXIT_PREEMPTED`` (75).

    The older sequence ``close()``, ``trainkit.shutdown()``, ``exit_preempted()`` does the same:
    each part is a no-op the second time.
    """
    from trainkit.dist import shutdown

    for manager in managers or list(_open_managers):
        try:
            manager.close()
        except Exception:
            # The preemption save itself committed (maybe_save blocks on it); a later background
            # error must not turn a clean, retriable exit into a crash.
            logger.exception("trainkit: closing a checkpoint manager before exiting failed")
    shutdown()
    record_and_exit_preempted()
