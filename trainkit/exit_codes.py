"""Process exit codes with a meaning that Kubernetes Job policies and trainkit-run match on, and
the preemption contract between trainkit-run and its workers (grace period, exit reports).

Shared by the checkpoint manager (which exits with them) and the launcher (which passes them on).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "EXIT_PREEMPTED",
    "EXIT_STATUS_DIR_VARIABLE",
    "GRACE_PERIOD_VARIABLE",
    "RESERVED_EXIT_CODES",
    "describe_exit_code",
    "read_grace_period_s",
    "record_worker_exit",
]

#: A worker saved an agreed checkpoint after SIGTERM and stopped on purpose: retry the pod.
#: 75 is sysexits' EX_TEMPFAIL ("temporary failure; try again"). Match it in a Job's
#: ``podFailurePolicy`` with ``action: Ignore`` (or ``Count`` with a larger backoffLimit).
EXIT_PREEMPTED = 75

#: Codes that trainkit-run passes through unchanged when a worker exits with one of them.
RESERVED_EXIT_CODES: dict[int, str] = {
    EXIT_PREEMPTED: "preempted, checkpoint committed",
}


def describe_exit_code(code: int) -> str:
    """A short human reading of a worker or launcher exit code (negative: killed by a signal)."""
    import signal

    if code in RESERVED_EXIT_CODES:
        return RESERVED_EXIT_CODES[code]
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code > 128:
        try:
            return f"exited after {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return "exited with an error" if code else "succeeded"


#: Seconds from SIGTERM to SIGKILL that workers may use for a preemption save; set it a few seconds
#: below the pod's terminationGracePeriodSeconds.
GRACE_PERIOD_VARIABLE = "TRAINKIT_GRACE_PERIOD_S"


def read_grace_period_s(env: Mapping[str, str] | None = None) -> float | None:
    """``TRAINKIT_GRACE_PERIOD_S`` as seconds, None when unset; ``ValueError`` naming a bad value."""
    import os

    env = os.environ if env is None else env
    raw = env.get(GRACE_PERIOD_VARIABLE, "")
    if raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{GRACE_PERIOD_VARIABLE}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{GRACE_PERIOD_VARIABLE}={raw!r} must be 0 or more seconds")
    return value


#: Set by trainkit-run for its workers: where a worker records the code it is about to exit with, so
#: the launcher can tell "workers saved and exited preempted" from "workers were killed" after SIGTERM.
EXIT_STATUS_DIR_VARIABLE = "TRAINKIT_EXIT_STATUS_DIR"


def record_worker_exit(code: int, env: Mapping[str, str] | None = None) -> None:
    """Tell the launcher (if any) which code this worker exits with; call right before exiting."""
    import os

    env = os.environ if env is None else env
    directory, rank = env.get(EXIT_STATUS_DIR_VARIABLE, ""), env.get("RANK", "")
    if not directory or not rank:
        return
    target = os.path.join(directory, f"rank-{rank}")
    temporary = f"{target}.tmp"
    try:
        with open(temporary, "w") as handle:
            handle.write(str(code))
        os.replace(temporary, target)
    except OSError:
        pass  # the launcher then reports a plain signal exit; the worker's exit must not fail on this
