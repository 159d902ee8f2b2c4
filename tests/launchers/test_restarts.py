"""How trainkit-run stops a worker group before the next rendezvous round."""

from __future__ import annotations

from launchers.restarts import FAILED_STOP_TIMEOUT_S, stop_timeout_s


def test_failed_group_is_stopped_fast_and_a_healthy_one_keeps_its_grace_period() -> None:
    assert stop_timeout_s("FAILED", 30) == FAILED_STOP_TIMEOUT_S
    assert stop_timeout_s("UNHEALTHY", 30) == FAILED_STOP_TIMEOUT_S
    assert stop_timeout_s("FAILED", 1) == 1  # never longer than the user's shutdown timeout
    assert stop_timeout_s("HEALTHY", 30) == 30  # a membership change: time to save the agreed step
