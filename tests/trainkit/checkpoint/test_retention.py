"""plan_retention: a pure function, checked on examples and as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainkit.checkpoint.retention import plan_retention


def test_keeps_last_and_every_and_drops_old_partials() -> None:
    doomed = plan_retention([10, 20, 30, 40, 50], [5, 45, 60], keep_last=2, keep_every=20)
    assert doomed == [
        5,
        10,
        30,
        45,
    ]  # 60 may still be in flight elsewhere; 20/40 kept by keep_every


def test_in_flight_is_never_deleted() -> None:
    assert plan_retention([1, 2, 3], [], keep_last=1, keep_every=None, in_flight=[2]) == [1]


def test_nothing_committed_deletes_nothing() -> None:
    assert plan_retention([], [1, 2], keep_last=1, keep_every=None) == []


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "message"), [(0, None, "keep_last (0)"), (1, 0, "keep_every (0)")]
)
def test_bad_policy(keep_last: int, keep_every: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_retention([], [], keep_last=keep_last, keep_every=keep_every)


@given(
    committed=st.sets(st.integers(0, 200), max_size=30),
    partial=st.sets(st.integers(0, 200), max_size=10),
    keep_last=st.integers(1, 5),
    keep_every=st.one_of(st.none(), st.integers(1, 50)),
    in_flight=st.sets(st.integers(0, 200), max_size=2),
)
def test_properties(
    committed: set[int],
    partial: set[int],
    keep_last: int,
    keep_every: int | None,
    in_flight: set[int],
) -> None:
    partial = partial - committed
    doomed = set(
        plan_retention(
            committed, partial, keep_last=keep_last, keep_every=keep_every, in_flight=in_flight
        )
    )
    assert not doomed & in_flight
    assert doomed <= committed | partial
    if committed:
        newest = max(committed)
        assert newest not in doomed
        assert sorted(committed)[-keep_last:] == [
            s for s in sorted(committed)[-keep_last:] if s not in doomed
        ]
        assert not {s for s in partial if s > newest} & doomed
        if keep_every:
            assert not {s for s in committed if s % keep_every == 0} & doomed
