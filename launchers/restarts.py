"""How ``trainkit-run`` stops its workers before a new rendezvous round: fast when the world broke.

torch's agent stops every worker group the same way (SIGTERM, then up to ``shutdown_timeout``
before SIGKILL), and when one local worker fails it gives the others 30 s before it even reports
the failure. After a failure the survivors sit in collectives on a dead peer (a SIGTERM cannot
interrupt those) and nothing they could still do counts, so they get ``FAILED_STOP_TIMEOUT_S``;
the same holds when the rendezvous handler reports that a pod of the current round left DNS.
A healthy group stopped for a membership change keeps the full grace period, in which trainkit's
checkpoint manager saves the step all ranks agree on, and so do the siblings of a worker that
exited 75 after an agreed save (they are writing their own exit records). Never changes when or
whether workers are restarted.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from trainkit.preemption import EXIT_PREEMPTED

__all__ = [
    "FAILED_STOP_TIMEOUT_S",
    "install_restart_policy",
    "sibling_stop_timeout_s",
    "stop_timeout_s",
]

#: Seconds between SIGTERM and SIGKILL for the rest of a worker group that already failed.
FAILED_STOP_TIMEOUT_S = 1

#: torch's wait for the rest of a worker group after one of its workers exited (``PContext.close``).
TORCH_SIBLING_STOP_TIMEOUT_S = 30


def stop_timeout_s(state_name: str, shutdown_timeout_s: int, *, peer_lost: bool = False) -> int:
    """Seconds to wait after SIGTERM for a worker group in ``state_name`` (torch's WorkerState);
    ``peer_lost``: a pod of the group's round has left (its workers wait on a dead peer)."""
    if peer_lost or state_name in {"FAILED", "UNHEALTHY"}:
        return min(FAILED_STOP_TIMEOUT_S, shutdown_timeout_s)
    return shutdown_timeout_s


def sibling_stop_timeout_s(exit_codes: Iterable[int]) -> int:
    """Seconds the rest of a local group gets after workers exited with ``exit_codes``: short
    after a failure, torch's own wait when one of them exited 75 (an agreed preemption)."""
    if any(code == EXIT_PREEMPTED for code in exit_codes):
        return TORCH_SIBLING_STOP_TIMEOUT_S
    return FAILED_STOP_TIMEOUT_S


def install_restart_policy(status_dir: Path) -> None:
    """Make torch's local agent in this process stop groups per ``stop_timeout_s`` and the rest
    of a group whose worker failed per ``sibling_stop_timeout_s``.

    Exit records the stopped workers left in ``status_dir`` (a save for a membership change) are
    cleared, so only the next round's workers can make a later SIGTERM exit 75.
    """
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    def _stop_workers(self: LocalElasticAgent, worker_group: object, *args: object) -> None:
        state = getattr(worker_group, "state", None)
        handler = getattr(getattr(worker_group, "spec", None), "rdzv_handler", None)
        lost = getattr(handler, "lost_peers", None)
        timeout = stop_timeout_s(
            getattr(state, "name", ""), self._shutdown_timeout, peer_lost=bool(lost and lost())
        )
        self._shutdown(timeout=timeout)
        for record in status_dir.glob("rank-*"):
            if record.is_dir():
                shutil.rmtree(record, ignore_errors=True)
            else:
                record.unlink(missing_ok=True)

    original_close = SubprocessContext.close

    def close(
        self: SubprocessContext, death_sig: object = None, timeout: int | None = None
    ) -> None:
        # torch calls close() without a timeout only from its poll, once a local worker exited.
        if timeout is None:
            failures = getattr(self, "_failures", {}) or {}
            timeout = sibling_stop_timeout_s(f.exitcode for f in failures.values())
        original_close(self, death_sig, timeout)  # type: ignore[arg-type]

    LocalElasticAgent._stop_workers = _stop_workers  # type: ignore[method-assign]
    SubprocessContext.close = close  # type: ignore[method-assign]
