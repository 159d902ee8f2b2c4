"""Properties of the pure epoch planner: exactly once across ranks, workers and resumes at other
world sizes, equal batches per rank, determinism, and bounded reads per rank."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.plan import (
    EpochOrder,
    batch_positions,
    fresh_cursor,
    make_split,
    rebase_cursor,
    remaining_intervals,
    worker_batch_indices,
)


def rank_batches(order, cursor, rank, num_workers):
    """Global row ids and padding flags a rank's loader yields, collected the way DataLoader does:
    round-robin over workers, each producing its dealt batches."""
    split = make_split(cursor)
    start = cursor.consumed // cursor.batch_size
    per_worker = [
        list(worker_batch_indices(split.num_batches, start, w, num_workers))
        for w in range(max(1, num_workers))
    ]
    collected = []
    while any(per_worker):
        for queue in per_worker:
            if queue:
                collected.append(queue.pop(0))
    assert collected == list(range(start, split.num_batches)), (
        "round-robin collection keeps batch order"
    )
    out = []
    for index in collected:
        positions, padding = batch_positions(split, rank, index)
        out.append((order.global_rows(positions), padding))
    return out


def consume(cursor, batches):
    from dataclasses import replace

    return replace(cursor, consumed=cursor.consumed + batches * cursor.batch_size)


@settings(max_examples=60, deadline=None)
@given(
    rg_rows=st.lists(st.integers(1, 40), min_size=1, max_size=25),
    block_rows=st.integers(1, 120),
    seed=st.integers(0, 2**31),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    world_a=st.integers(1, 8),
    world_b=st.integers(1, 8),
    workers_a=st.integers(0, 3),
    workers_b=st.integers(0, 3),
    batch_a=st.integers(1, 9),
    batch_b=st.integers(1, 9),
    stop_fraction=st.floats(0, 1),
    second_stop_fraction=st.floats(0, 1),
)
def test_resume_at_other_world_delivers_each_sample_once(
    rg_rows,
    block_rows,
    seed,
    shuffle,
    drop_last,
    world_a,
    world_b,
    workers_a,
    workers_b,
    batch_a,
    batch_b,
    stop_fraction,
    second_stop_fraction,
):
    order = EpochOrder(rg_rows, seed=seed, epoch=3, shuffle=shuffle, block_rows=block_rows)
    num_rows = order.num_rows
    delivered: list[np.ndarray] = []

    def run_segment(cursor, world, workers, fraction):
        split = make_split(cursor)
        per_rank = [rank_batches(order, cursor, rank, workers) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1, (
            "every rank gets the same number of batches"
        )
        assert all(len(ids) == cursor.batch_size for batches in per_rank for ids, _ in batches)
        stop = int(fraction * len(per_rank[0]))
        for batches in per_rank:
            for ids, padding in batches[:stop]:
                delivered.append(ids[~padding])
        return consume(cursor, stop), split

    cursor = fresh_cursor(num_rows, 3, world_a, batch_a, drop_last)
    cursor, _ = run_segment(cursor, world_a, workers_a, stop_fraction)
    cursor = rebase_cursor(cursor, world_b, batch_b, drop_last)
    cursor, _ = run_segment(cursor, world_b, workers_b, second_stop_fraction)
    # the state a checkpoint would hold: resume once more, at the first world, to the end
    cursor = rebase_cursor(cursor, world_a, batch_a, drop_last)
    cursor, final_split = run_segment(cursor, world_a, workers_a, 1.0)

    ids = np.concatenate(delivered) if delivered else np.zeros(0, np.int64)
    assert len(ids) == len(np.unique(ids)), "no sample is delivered twice"
    left = remaining_intervals(cursor)
    not_delivered = sum(b - a for a, b in left)
    assert not_delivered == final_split.num_dropped, "only the reported drop is left undelivered"
    assert len(ids) + not_delivered == num_rows
    if not drop_last:
        assert set(ids.tolist()) == set(range(num_rows))


@settings(max_examples=40, deadline=None)
@given(
    rg_rows=st.lists(st.integers(1, 50), min_size=1, max_size=20),
    seed=st.integers(0, 1000),
    world=st.integers(1, 8),
    batch=st.integers(1, 8),
    workers=st.integers(0, 3),
)
def test_order_is_deterministic_and_independent_of_workers(rg_rows, seed, world, batch, workers):
    order = EpochOrder(rg_rows, seed=seed, epoch=1, shuffle=True, block_rows=30)
    again = EpochOrder(rg_rows, seed=seed, epoch=1, shuffle=True, block_rows=30)
    cursor = fresh_cursor(order.num_rows, 1, world, batch, drop_last=False)
    for rank in range(world):
        with_workers = rank_batches(order, cursor, rank, workers)
        without = rank_batches(again, cursor, rank, 0)
        assert len(with_workers) == len(without)
        for (a, pa_), (b, pb) in zip(with_workers, without, strict=True):
            assert np.array_equal(a, b) and np.array_equal(pa_, pb)


def test_same_world_resume_continues_in_the_same_order():
    order = EpochOrder([17, 5, 33, 20, 9], seed=7, epoch=0, shuffle=True, block_rows=25)
    cursor = fresh_cursor(order.num_rows, 0, 3, 4, drop_last=True)
    full = [rank_batches(order, cursor, rank, 2) for rank in range(3)]
    resumed_cursor = rebase_cursor(consume(cursor, 2), 3, 4, True)
    assert resumed_cursor.consumed == 8, "the same world keeps its split"
    for rank in range(3):
        rest = rank_batches(order, resumed_cursor, rank, 1)
        assert [ids.tolist() for ids, _ in rest] == [ids.tolist() for ids, _ in full[rank][2:]]


def test_shuffle_mixes_rows_across_row_groups_and_epochs():
    order0 = EpochOrder([100] * 10, seed=0, epoch=0, shuffle=True, block_rows=300)
    order1 = EpochOrder([100] * 10, seed=0, epoch=1, shuffle=True, block_rows=300)
    rows0 = order0.global_rows(np.arange(1000))
    rows1 = order1.global_rows(np.arange(1000))
    assert sorted(rows0.tolist()) == list(range(1000))
    assert not np.array_equal(rows0, rows1)
    first_batch_groups = set((rows0[:32] // 100).tolist())
    assert len(first_batch_groups) >= 2, "a batch draws from several row groups of its block"
    unshuffled = EpochOrder([100] * 10, seed=0, epoch=0, shuffle=False)
    assert np.array_equal(unshuffled.global_rows(np.arange(1000)), np.arange(1000))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_each_rank_reads_only_its_own_row_groups(world):
    rg_rows = [2048] * 100  # 200k rows in 100 row groups, block_rows by default
    order = EpochOrder(rg_rows, seed=1, epoch=0, shuffle=True)
    cursor = fresh_cursor(order.num_rows, 0, world, 64, drop_last=True)
    split = make_split(cursor)
    groups_read = 0
    for rank in range(world):
        positions = np.concatenate(
            [batch_positions(split, rank, b)[0] for b in range(split.num_batches)]
        )
        groups, _ = order.locate(positions)
        groups_read += len(np.unique(groups))
    assert groups_read <= 1.1 * len(rg_rows), (
        f"{groups_read} row group reads for {len(rg_rows)} row groups"
    )


def test_drop_and_pad_are_explicit():
    cursor = fresh_cursor(103, 0, 4, 5, drop_last=True)
    split = make_split(cursor)
    assert (split.num_batches, split.num_dropped, split.num_padded) == (5, 3, 0)
    padded = make_split(fresh_cursor(103, 0, 4, 5, drop_last=False))
    assert (padded.num_batches, padded.num_dropped, padded.num_padded) == (6, 0, 17)


def test_state_must_belong_to_its_split():
    from dataclasses import replace

    cursor = fresh_cursor(100, 0, 2, 10, drop_last=True)
    with pytest.raises(ValueError, match="not a whole number of batches"):
        make_split(replace(cursor, consumed=15))
    with pytest.raises(ValueError, match="seed"):
        EpochOrder([1], seed=-1, epoch=0, shuffle=True)


@pytest.mark.parametrize("num_workers", [1, 3])
def test_planned_worker_batches_are_the_rank_batches_grouped_by_row_group(num_workers):
    from shards.plan import plan_worker_batches

    order = EpochOrder([40, 25, 60, 33, 50] * 4, seed=3, epoch=1, shuffle=True, block_rows=90)
    cursor = fresh_cursor(order.num_rows, 1, 2, 16, True)
    split = make_split(cursor)
    for rank in range(2):
        planned = {}
        for worker in range(num_workers):
            batches = list(plan_worker_batches(split, order, rank, 0, worker, num_workers, 4))
            indices = worker_batch_indices(split.num_batches, 0, worker, num_workers)
            planned.update(zip(indices, batches, strict=True))
        assert sorted(planned) == list(range(split.num_batches))
        for index, batch in planned.items():
            expected = order.global_rows(batch_positions(split, rank, index)[0])
            rows = order.rg_offsets[batch.groups] + batch.rows
            assert sorted(rows.tolist()) == sorted(expected.tolist())
            assert np.all(np.diff(batch.groups) >= 0), "each row group's rows together"
            assert batch.row_groups == tuple(np.unique(batch.groups).tolist())
