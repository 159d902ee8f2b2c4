"""The run's control point on the Ray cluster: attempt numbers, the stop request, each rank's exit.

One small actor per launch, created by the driver and outliving worker-group restarts; it holds
plain data only and never starts or stops a process itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

__all__ = ["RankExit", "RunControl"]


@dataclass(frozen=True)
class RankExit:
    """How one rank's training process ended in one attempt."""

    rank: int
    code: int
    unix_s: float
    error: str | None = None
    value: bytes | None = None  # a function target's pickled return value


@dataclass
class RunControl:
    """State shared by the driver (stop, summary) and the workers (attempts, exits)."""

    attempt: int = -1
    stop: bool = False
    exits: dict[int, dict[int, RankExit]] = field(default_factory=dict)

    def begin_attempt(self) -> int:
        """Number the worker group that is starting: 0 first, then one more per restart."""
        self.attempt += 1
        return self.attempt

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    async def wait_for_stop(self, timeout_s: float) -> bool:
        """True as soon as a stop is requested (False after ``timeout_s``).

        Workers long-poll this so that every rank forwards SIGTERM within a few milliseconds of
        the others, as torchrun's agent signals its workers at once: a late SIGTERM could reach a
        process that already saved and is shutting down with the default handler back in place.
        """
        deadline = time.monotonic() + timeout_s
        while not self.stop and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.stop

    def report_exit(
        self, attempt: int, rank: int, code: int, error: str | None, value: bytes | None
    ) -> None:
        self.exits.setdefault(attempt, {})[rank] = RankExit(rank, code, time.time(), error, value)

    def summary(self) -> tuple[int, bool, dict[int, RankExit]]:
        """(last attempt, whether a stop was requested, that attempt's exits by rank)."""
        return self.attempt, self.stop, dict(self.exits.get(self.attempt, {}))
