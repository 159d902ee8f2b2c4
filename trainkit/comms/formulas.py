"""Bandwidth figures exactly as nccl-tests defines them (doc/PERFORMANCE.md of NVIDIA/nccl-tests).

``size_bytes`` is nccl-tests' "size": the whole buffer of the operation (all_gather: the gathered
output; reduce_scatter and alltoall: the full input), so ``algbw = size / time``.
"""

from __future__ import annotations

__all__ = ["OPERATIONS", "algbw_gbps", "bus_factor", "busbw_gbps"]

#: Operations the benchmark runs, in nccl-tests' spelling.
OPERATIONS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "alltoall")


def bus_factor(operation: str, world_size: int) -> float:
    """busbw / algbw: what each rank's link must carry relative to ``size / time``.

    all_reduce 2(n-1)/n; all_gather, reduce_scatter and alltoall (n-1)/n; broadcast 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be at least 1")
    n = world_size
    factors = {
        "all_reduce": 2 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "alltoall": (n - 1) / n,
        "broadcast": 1.0,
    }
    if operation not in factors:
        raise ValueError(f"unknown collective {operation!r}; choose from {', '.join(OPERATIONS)}")
    return factors[operation]


def algbw_gbps(size_bytes: int, time_s: float) -> float:
    """Algorithm bandwidth in GB/s (1e9 bytes, as nccl-tests prints)."""
    if time_s <= 0:
        raise ValueError(f"time_s ({time_s}) must be positive")
    return size_bytes / time_s / 1e9


def busbw_gbps(operation: str, size_bytes: int, time_s: float, world_size: int) -> float:
    """Bus bandwidth in GB/s: algbw times ``bus_factor``, comparable to the link's peak."""
    return algbw_gbps(size_bytes, time_s) * bus_factor(operation, world_size)
