"""algbw/busbw against nccl-tests' definitions (doc/PERFORMANCE.md) and the ring's bytes on the wire."""

from __future__ import annotations

import pytest

from trainkit.comms.formulas import OPERATIONS, algbw_gbps, bus_factor, busbw_gbps


def ring_bytes_sent_per_rank(operation: str, size_bytes: int, n: int) -> float:
    """Bytes one rank puts on its link in the bandwidth-optimal algorithm, size per nccl-tests."""
    chunk = size_bytes / n
    return {
        "all_reduce": 2 * (n - 1) * chunk,  # reduce-scatter then all-gather, n-1 steps each
        "all_gather": (n - 1) * chunk,  # size = gathered output, each rank forwards n-1 chunks
        "reduce_scatter": (n - 1) * chunk,  # size = full input
        "alltoall": (n - 1) * chunk,  # size = the rank's whole send buffer, keeps its own chunk
        "broadcast": size_bytes,  # pipelined chain: every byte crosses each link once
    }[operation]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("n", [1, 2, 3, 8, 16, 1024])
def test_busbw_is_the_bytes_each_rank_sends_per_second(operation: str, n: int) -> None:
    size, time_s = 256 << 20, 0.0125
    expected = ring_bytes_sent_per_rank(operation, size, n) / time_s / 1e9
    assert busbw_gbps(operation, size, time_s, n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("operation", "n", "factor"),
    [
        ("all_reduce", 8, 2 * 7 / 8),
        ("all_reduce", 2, 1.0),
        ("all_reduce", 1, 0.0),
        ("all_gather", 8, 7 / 8),
        ("reduce_scatter", 4, 3 / 4),
        ("alltoall", 16, 15 / 16),
        ("broadcast", 8, 1.0),
    ],
)
def test_factors_match_nccl_tests_table(operation: str, n: int, factor: float) -> None:
    assert bus_factor(operation, n) == pytest.approx(factor)


def test_algbw_is_size_over_time_in_decimal_gigabytes() -> None:
    # nccl-tests prints GB/s with 1e9: 1 GiB in 0.5 s is 2.147 GB/s, not 2.
    assert algbw_gbps(1 << 30, 0.5) == pytest.approx(2.147483648)


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="allreduce"):
        bus_factor("allreduce", 4)
    with pytest.raises(ValueError, match=r"world_size \(0\)"):
        bus_factor("all_reduce", 0)
    with pytest.raises(ValueError, match=r"time_s \(0\)"):
        algbw_gbps(10, 0)
