"""The preemption contract between workers and trainkit-run: the signal flag and its watchdog, the
agreed stop, ``exit_preempted()``, the exit record a worker leaves, and how the launcher decides
its own exit code from those records. Nothing here saves a checkpoint or imports torch at import.

One part lives elsewhere because ``shards`` may not import trainkit: ``shards.ShardedLoader``'s
DataLoader workers ignore SIGTERM so the agreed save is not interrupted by their death.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_PREEMPTED",
    "EXIT_STATUS_DIR_VARIABLE",
    "GRACE_PERIOD_VARIABLE",
    "RESERVED_EXIT_CODES",
    "UNANSWERED_SIGNAL_TIMEOUT_S",
    "ExitRecord",
    "PreemptionSignal",
    "agree_any",
    "describe_exit_code",
    "exit_preempted",
    "launcher_exit_code",
    "note_agreed_preemption",
    "preemption_agreed",
    "read_exit_records",
    "read_grace_period_s",
    "record_worker_exit",
]

logger = logging.getLogger(__name__)

#: A worker saved an agreed checkpoint after SIGTERM and stopped on purpose: retry the pod.
#: 75 is sysexits' EX_TEMPFAIL ("temporary failure; try again"). Match it in a Job's
#: ``podFailurePolicy`` with ``action: Ignore`` (or ``Count`` with a larger backoffLimit).
EXIT_PREEMPTED = 75

#: Codes that trainkit-run passes through unchanged when a worker exits with one of them.
RESERVED_EXIT_CODES: dict[int, str] = {
    EXIT_PREEMPTED: "preempted, checkpoint committed",
}

#: Seconds from SIGTERM to SIGKILL that workers may use for a preemption save; set it a few seconds
#: below the pod's terminationGracePeriodSeconds.
GRACE_PERIOD_VARIABLE = "TRAINKIT_GRACE_PERIOD_S"

#: Set by trainkit-run for its workers: where a worker records the code it is about to exit with, so
#: the launcher can tell "workers saved and exited preempted" from "workers were killed" after SIGTERM.
EXIT_STATUS_DIR_VARIABLE = "TRAINKIT_EXIT_STATUS_DIR"

#: Without a known grace period: how long a handled signal may go unanswered by ``maybe_save``
#: before the process falls back to the signal's default action.
UNANSWERED_SIGNAL_TIMEOUT_S = 60.0


def describe_exit_code(code: int) -> str:
    """A short human reading of a worker or launcher exit code (negative: killed by a signal)."""
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


def read_grace_period_s(env: Mapping[str, str] | None = None) -> float | None:
    """``TRAINKIT_GRACE_PERIOD_S`` as seconds, None when unset; ``ValueError`` naming a bad value."""
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


# ----- the exit record: worker -> launcher -----------------------------------------------------


@dataclass(frozen=True)
class ExitRecord:
    """What a worker tells trainkit-run before exiting: its code and, for a preemption, the step
    all ranks agreed on and whether that step's checkpoint committed."""

    code: int
    step: int | None = None
    committed: bool = False

    def encode(self) -> str:
        return json.dumps({"code": self.code, "step": self.step, "committed": self.committed})

    @classmethod
    def decode(cls, text: str) -> ExitRecord:
        """Parse a record; a bare integer (older workers) carries no agreement."""
        text = text.strip()
        if not text.startswith("{"):
            return cls(code=int(text))
        data = json.loads(text)
        step = data.get("step")
        return cls(
            code=int(data["code"]),
            step=step if isinstance(step, int) and not isinstance(step, bool) else None,
            committed=data.get("committed") is True,
        )


def record_worker_exit(
    code: int,
    env: Mapping[str, str] | None = None,
    *,
    step: int | None = None,
    committed: bool = False,
) -> None:
    """Tell the launcher (if any) which code this worker exits with; call right before exiting."""
    env = os.environ if env is None else env
    directory, rank = env.get(EXIT_STATUS_DIR_VARIABLE, ""), env.get("RANK", "")
    if not directory or not rank:
        return
    target = os.path.join(directory, f"rank-{rank}")
    temporary = f"{target}.tmp"
    try:
        with open(temporary, "w") as handle:
            handle.write(ExitRecord(code, step, committed).encode())
        os.replace(temporary, target)
    except OSError:
        pass  # the launcher then reports a plain signal exit; the worker's exit must not fail on this


def read_exit_records(status_dir: Path) -> dict[int, ExitRecord]:
    """Records in trainkit-run's exit-status directory by global rank; unreadable ones are skipped."""
    records: dict[int, ExitRecord] = {}
    for path in status_dir.glob("rank-*"):
        try:
            records[int(path.name.removeprefix("rank-"))] = ExitRecord.decode(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def preemption_agreed(records: Mapping[int, ExitRecord], ranks: Iterable[int]) -> bool:
    """True when every rank in ``ranks`` recorded a preemption exit after a committed save, and all
    records name the same agreed step."""
    ranks = list(ranks)
    if not ranks or any(rank not in records for rank in ranks):
        return False
    steps = {record.step for record in records.values()}
    return len(steps) == 1 and all(
        record.code == EXIT_PREEMPTED and record.committed and record.step is not None
        for record in records.values()
    )


def launcher_exit_code(
    failure_codes: Mapping[int, int], first_rank: int, records: Mapping[int, ExitRecord]
) -> int:
    """trainkit-run's exit code from the failed workers' codes (global rank -> code).

    ``EXIT_PREEMPTED`` only when every failed worker exited with it and recorded the same committed
    preemption step; otherwise 1, because a crash that merely exits 75 must not be retried forever.
    """
    if set(failure_codes.values()) == {EXIT_PREEMPTED} and preemption_agreed(
        records, failure_codes
    ):
        return EXIT_PREEMPTED
    del first_rank  # kept for callers that report it; no other code is passed through
    return 1


# ----- in the worker: the signal, the agreement, the exit ----------------------------------------

_agreed_preemption: tuple[int, bool] | None = None


def note_agreed_preemption(step: int, committed: bool) -> None:
    """Remember the step every rank agreed to stop at, for ``exit_preempted``'s record."""
    global _agreed_preemption
    _agreed_preemption = (step, committed)


def exit_preempted() -> None:
    """Exit with ``EXIT_PREEMPTED`` after telling trainkit-run (if any) the agreed, committed step.

    Without an agreed preemption save in this process the record says so, and trainkit-run does
    not exit 75 for it.
    """
    import sys

    step, committed = _agreed_preemption or (None, False)
    if not committed:
        logger.warning(
            "trainkit: exit_preempted() without a committed preemption save; trainkit-run will "
            "report a failure, not a preemption"
        )
    record_worker_exit(EXIT_PREEMPTED, step=step, committed=committed)
    sys.exit(EXIT_PREEMPTED)


def agree_any(flag: bool, group: Any) -> bool:
    """True on every rank when ``flag`` is True on any rank: one tiny MAX all-reduce on ``group``
    (a CPU group, so no GPU stream is synchronised); None means a world of one."""
    if group is None:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


class PreemptionSignal:
    """Handles ``signals`` by setting a flag; a watchdog ends the process the default way when the
    flag goes unanswered (no ``answer()``) for ``timeout_s``.

    A script that builds a ``CheckpointManager`` but never calls ``maybe_save`` would otherwise
    ignore SIGTERM until the kubelet's SIGKILL. The handler only runs in the main thread.
    """

    def __init__(
        self,
        signals: Iterable[int] | None,
        *,
        timeout_s: float | None,
    ) -> None:
        self.timeout_s = UNANSWERED_SIGNAL_TIMEOUT_S if timeout_s is None else timeout_s
        self.requested = False
        self.request_time: float | None = None
        self._answered = threading.Event()
        self._watchdog: threading.Timer | None = None
        self._falling_back: int | None = None
        self._previous: dict[int, Any] = {}
        if signals is not None and threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def request(self) -> None:
        """What the handler does (also callable directly): set the flag, once."""
        if not self.requested:
            self.request_time = time.monotonic()
        self.requested = True

    def answer(self) -> None:
        """The request reached an agreement point: the watchdog stands down."""
        self._answered.set()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def restore(self, *, stopping: bool = False) -> None:
        """Put back the handlers that were installed before, unless ``stopping``.

        ``stopping`` (ranks agreed to save and stop): the handlers stay installed and only set the
        flag, with no watchdog, so a second SIGTERM during shutdown cannot end the process with
        the signal's default action before it exits ``EXIT_PREEMPTED``.
        """
        if self._watchdog is not None:
            self._watchdog.cancel()
        if stopping:
            self._answered.set()
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self._falling_back == signum:
            self._end_with_default_action(signum)
            return
        first = not self.requested
        self.request()
        if first and not self._answered.is_set() and signum in self._previous:
            # A thread, started only now: nothing runs at import or construction.
            self._watchdog = threading.Timer(self.timeout_s, self._fall_back, args=(signum,))
            self._watchdog.daemon = True
            self._watchdog.start()

    def _fall_back(self, signum: int) -> None:
        if self._answered.is_set():
            return
        message = (
            f"trainkit: {signal.Signals(signum).name} arrived {self.timeout_s:g} s ago and no "
            "CheckpointManager.maybe_save() answered it; ending the process with the signal's "
            "default action (call maybe_save every step to save and stop on preemption)"
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=1)
        self._falling_back = signum
        # The handler itself must restore the default: only the main thread may change handlers.
        os.kill(os.getpid(), signum)

    def _end_with_default_action(self, signum: int) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if not callable(previous):
            previous = signal.SIG_DFL
        signal.signal(signum, previous)
        if previous is signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        else:
            previous(signum, None)
