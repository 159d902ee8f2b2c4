"""Leaving after an agreed preemption in one call: finish every open ``CheckpointManager``'s save,
leave the process group, record the exit for trainkit-run and exit 75.

It tracks open managers only through weak references, and never saves anything itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any, NoReturn

from trainkit.preemption import EXIT_PREEMPTED, read_grace_period_s
from trainkit.preemption import exit_preempted as record_and_exit_preempted

if TYPE_CHECKING:
    from trainkit.checkpoint.manager import CheckpointManager

__all__ = ["exit_preempted", "track_open_manager", "untrack_manager"]

logger = logging.getLogger(__name__)

# How long leaving the process group may take before the process exits without it. A peer lost
# after the agreed save (its pod deleted first) leaves the others' barrier waiting for the
# collective timeout (10 minutes by default), far past the kubelet's SIGKILL: 137, not 75.
LEAVE_TIMEOUT_S = 30.0

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
    timeout_s = leave_timeout_s()
    if not shutdown(timeout_s=timeout_s):
        logger.warning(
            "trainkit: leaving the process group took over %.0f s (a peer gone after the agreed "
            "save?); exiting without it",
            timeout_s,
        )
        with contextlib.suppress(SystemExit):
            record_and_exit_preempted()  # writes the exit record, then raises SystemExit(75)
        sys.stdout.flush()
        sys.stderr.flush()
        # the interpreter's teardown would wait on the stuck group: leave now, the record written
        os._exit(EXIT_PREEMPTED)
    record_and_exit_preempted()


def leave_timeout_s() -> float:
    """``LEAVE_TIMEOUT_S``, or half the grace period when that is shorter (the rest is the save's)."""
    grace_s = read_grace_period_s()
    return LEAVE_TIMEOUT_S if grace_s is None else min(LEAVE_TIMEOUT_S, grace_s / 2)
