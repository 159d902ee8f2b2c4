"""Which steps to delete: a pure function of the committed and partial steps and the policy.

It never names the step being written, the newest committed step, or a partial step newer than
the newest committed one (it may belong to a save that is still running elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["plan_retention"]


def plan_retention(
    committed: Iterable[int],
    partial: Iterable[int],
    *,
    keep_last: int | None,
    keep_every: int | None,
    in_flight: Iterable[int] = (),
) -> list[int]:
    """Steps whose directories can be removed, ascending.

    Kept: the ``keep_last`` newest committed steps (all when None), committed steps divisible by
    ``keep_every``, anything in ``in_flight``. Removed: other committed steps, and partial
    (uncommitted) steps older than the newest committed step, which no save will ever finish.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last ({keep_last}) must be at least 1 (or None to keep every step)")
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"keep_every ({keep_every}) must be at least 1 (or None)")
    committed_sorted = sorted(set(committed))
    protected = set(in_flight)
    if not committed_sorted:
        return []
    kept = set(committed_sorted if keep_last is None else committed_sorted[-keep_last:])
    if keep_every is not None:
        kept |= {step for step in committed_sorted if step % keep_every == 0}
    newest = committed_sorted[-1]
    doomed = {step for step in committed_sorted if step not in kept}
    doomed |= {step for step in partial if step < newest and step not in set(committed_sorted)}
    return sorted(doomed - protected)
