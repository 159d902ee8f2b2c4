"""Errors raised by trainkit.checkpoint: one small tree, every message names the step, file or key.

Catch ``CheckpointError`` for all of them; nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotWritableError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "UnsupportedCheckpointError",
    "describe_failure",
    "find_corruption",
]


class CheckpointError(Exception):
    """Base class of every checkpoint error.

    Errors cross process boundaries: DCP gathers a rank's read error to every rank by pickling it.
    The default ``Exception`` pickling calls ``cls(*args)``, which breaks for subclasses whose
    constructor takes more than the message, so every subclass is rebuilt from its message and
    attributes instead.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(
    cls: type[CheckpointError], args: tuple[Any, ...], attributes: dict[str, Any]
) -> CheckpointError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(attributes)
    return error


class CheckpointNotWritableError(CheckpointError):
    """The checkpoint root cannot be created or written."""


class CorruptCheckpointError(CheckpointError):
    """A committed step's record or files do not verify (size, checksum, unreadable record)."""

    def __init__(self, step: int | None, message: str) -> None:
        super().__init__(message)
        self.step = step


class UnsupportedCheckpointError(CheckpointError):
    """A committed step in a format this trainkit refuses to read (pickled metadata of format 1)."""

    def __init__(self, step: int | None, message: str) -> None:
        super().__init__(message)
        self.step = step


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the state being restored (missing or unexpected keys, shapes)."""

    def __init__(self, step: int, message: str, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.keys = keys or []


class CheckpointSaveError(CheckpointError):
    """A save failed (reported at the next ``save``/``wait``/``close`` when it ran in the background)."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


def describe_failure(error: BaseException) -> str:
    """One line per failed rank, without DCP's wrapped tracebacks."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {rank}: {type(cause).__name__}: {cause}")
        return "; ".join(parts)
    return f"{type(error).__name__}: {error}"


def find_corruption(error: BaseException) -> CorruptCheckpointError | None:
    """DCP wraps per-rank failures in CheckpointException; find ours inside."""
    seen: set[int] = set()
    stack: list[Any] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CorruptCheckpointError):
            return current
        if isinstance(current, BaseException):
            stack.extend([current.__cause__, current.__context__])
            failures = getattr(current, "failures", None)
            if isinstance(failures, dict):
                stack.extend(failures.values())
        if isinstance(current, tuple):
            stack.extend(current)
    return None
