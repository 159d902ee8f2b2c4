"""How trainkit-run stops a worker group before the next rendezvous round."""

from __future__ import annotations

from launchers.restarts import (
    FAILED_STOP_TIMEOUT_S,
    TORCH_SIBLING_STOP_TIMEOUT_S,
    sibling_stop_timeout_s,
    stop_timeout_s,
)
from trainkit.preemption import EXIT_PREEMPTED


def test_failed_group_is_stopped_fast_and_a_healthy_one_keeps_its_grace_period() -> None:
    assert stop_timeout_s("FAILED", 30) == FAILED_STOP_TIMEOUT_S
    assert stop_timeout_s("UNHEALTHY", 30) == FAILED_STOP_TIMEOUT_S
    assert stop_timeout_s("FAILED", 0) == 0  # never longer than the user's shutdown timeout
    assert stop_timeout_s("HEALTHY", 30) == 30  # a membership change: time to save the agreed step
    # A pod of the round left DNS: the healthy-looking workers are blocked on a dead peer.
    assert stop_timeout_s("HEALTHY", 30, peer_lost=True) == FAILED_STOP_TIMEOUT_S


def test_siblings_of_a_failed_worker_are_stopped_fast_but_not_after_an_agreed_preemption() -> None:
    assert sibling_stop_timeout_s([1]) == FAILED_STOP_TIMEOUT_S
    assert sibling_stop_timeout_s([-9, 1]) == FAILED_STOP_TIMEOUT_S
    # They are still writing their own exit records: torch's own wait.
    assert sibling_stop_timeout_s([EXIT_PREEMPTED]) == TORCH_SIBLING_STOP_TIMEOUT_S
    assert sibling_stop_timeout_s([EXIT_PREEMPTED, 1]) == TORCH_SIBLING_STOP_TIMEOUT_S
