"""How ``trainkit-run`` stops its workers before a new rendezvous round: fast when the world broke.

torch's agent stops every worker group the same way (SIGTERM, then up to ``shutdown_timeout``
before SIGKILL). After a failure the survivors sit in collectives on a dead peer and nothing they
could still do counts, so they get ``FAILED_STOP_TIMEOUT_S``; a healthy group stopped for a
membership change keeps the full grace period, in which trainkit's checkpoint manager saves the
step all ranks agree on. Never changes when or whether workers are restarted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["FAILED_STOP_TIMEOUT_S", "install_restart_policy", "stop_timeout_s"]

#: Seconds between SIGTERM and SIGKILL for the rest of a worker group that already failed.
FAILED_STOP_TIMEOUT_S = 2


def stop_timeout_s(state_name: str, shutdown_timeout_s: int) -> int:
    """Seconds to wait after SIGTERM for a worker group in ``state_name`` (torch's WorkerState)."""
    if state_name in {"FAILED", "UNHEALTHY"}:
        return min(FAILED_STOP_TIMEOUT_S, shutdown_timeout_s)
    return shutdown_timeout_s


def install_restart_policy(status_dir: Path) -> None:
    """Make torch's local agent in this process stop groups per ``stop_timeout_s``.

    Exit records the stopped workers left in ``status_dir`` (a save for a membership change) are
    cleared, so only the next round's workers can make a later SIGTERM exit 75.
    """
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    def _stop_workers(self: LocalElasticAgent, worker_group: object, *args: object) -> None:
        state = getattr(worker_group, "state", None)
        timeout = stop_timeout_s(getattr(state, "name", ""), self._shutdown_timeout)
        self._shutdown(timeout=timeout)
        for record in status_dir.glob("rank-*"):
            if record.is_dir():
                shutil.rmtree(record, ignore_errors=True)
            else:
                record.unlink(missing_ok=True)

    LocalElasticAgent._stop_workers = _stop_workers  # type: ignore[method-assign]
