"""Closing iterations still alive when the interpreter exits, while the modules they need still work.

A script may exit with a loader iterator alive (a module-level loop, ``it = iter(loader)``). At exit,
multiprocessing terminates daemonic children and joins them, and interpreter shutdown then tears
down modules under suspended generators, so their ``finally`` blocks fail. Closing live iterations
first ends their worker processes and readahead threads the normal way. Nothing here runs at import.
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from collections.abc import Generator
from typing import Any, TypeVar

__all__ = ["close_at_exit"]

_Iteration = TypeVar("_Iteration", bound=Generator[Any, Any, Any])

_live_iterations: weakref.WeakSet[Generator[Any, Any, Any]] = weakref.WeakSet()
_hook_registered = False


def close_at_exit(iteration: _Iteration) -> _Iteration:
    """``iteration``, to be closed at interpreter exit if it is still alive then.

    The hook is registered on first use, after torch's and multiprocessing's own exit hooks (their
    modules are imported by then), so it runs before them: atexit is last-in, first-out.
    """
    global _hook_registered
    if not _hook_registered:
        atexit.register(_close_live_iterations)
        _hook_registered = True
    _live_iterations.add(iteration)
    return iteration


def _close_live_iterations() -> None:
    for iteration in list(_live_iterations):
        with contextlib.suppress(ValueError):  # running in another thread: leave it to that thread
            iteration.close()
