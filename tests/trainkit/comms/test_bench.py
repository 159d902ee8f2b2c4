"""The benchmark's pure parts: sizes, config checks, the gate and the slow-link finder."""

from __future__ import annotations

import itertools

import pytest

from trainkit.comms.bench import (
    BenchConfig,
    Measurement,
    _element_count,
    find_slow_links,
    gate_failures,
    parse_size,
    size_sweep,
)


def test_sizes() -> None:
    assert (
        parse_size("64K") == 65536 and parse_size("1M") == 1 << 20 and parse_size("2g") == 2 << 30
    )
    assert parse_size("4096") == 4096 and parse_size("8MiB") == 8 << 20
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")
    assert size_sweep(1024, 16384, 4) == [1024, 4096, 16384]
    assert size_sweep(8, 8) == [8]
    with pytest.raises(ValueError, match=r"min_bytes \(9\)"):
        size_sweep(9, 8)


def test_config_names_bad_operations() -> None:
    with pytest.raises(ValueError, match="allreduce"):
        BenchConfig(operations=("allreduce",))
    with pytest.raises(ValueError, match=r"num_iterations \(0\)"):
        BenchConfig(num_iterations=0)


def test_element_counts_divide_by_world_for_split_operations() -> None:
    assert _element_count("all_reduce", 1000, 4, 3) == 250
    assert _element_count("all_gather", 1000, 4, 3) == 249  # whole chunks per rank, like nccl-tests
    assert _element_count("alltoall", 4, 4, 8) == 8


def speeds(
    num_pods: int, slow: set[int], fast: float = 2.0, throttled: float = 0.1
) -> dict[tuple[int, int], float]:
    return {
        (a, b): throttled if slow & {a, b} else fast * (1 + 0.05 * ((a + b) % 3))
        for a, b in itertools.combinations(range(num_pods), 2)
    }


@pytest.mark.parametrize("num_pods", [3, 4, 8])
def test_one_throttled_pod_is_named(num_pods: int) -> None:
    report = find_slow_links(speeds(num_pods, {1}))
    assert report.slow_pods == (1,)
    assert set(report.slow_pairs) == {
        tuple(sorted((1, other))) for other in range(num_pods) if other != 1
    }


def test_no_slow_link_on_uniform_speeds() -> None:
    report = find_slow_links(speeds(6, set()))
    assert report.slow_pods == () and report.slow_pairs == ()


def test_two_pods_slow_pair_blames_nobody() -> None:
    report = find_slow_links({(0, 1): 0.1})
    assert report.slow_pods == ()  # nothing to compare against


def test_one_bad_cable_between_two_healthy_pods() -> None:
    pairs = speeds(4, set())
    pairs[(0, 3)] = 0.05
    report = find_slow_links(pairs)
    assert report.slow_pairs == ((0, 3),) and report.slow_pods == ()


def test_gate_uses_the_largest_size() -> None:
    def m(operation: str, size: int, busbw: float) -> Measurement:
        return Measurement(operation, size, size // 4, "float32", 2, 1.0, busbw, busbw)

    measurements = [
        m("all_reduce", 1024, 0.001),
        m("all_reduce", 1 << 20, 5.0),
        m("broadcast", 1 << 20, 0.5),
    ]
    failures = gate_failures(measurements, 1.0)
    assert len(failures) == 1 and failures[0].startswith("broadcast at 1048576 bytes: busbw 0.500")


def test_pairwise_report_names_the_host() -> None:
    from trainkit.comms.bench import PairResult, format_pairwise

    hosts = {0: "w-0", 1: "w-1", 2: "w-2"}
    gbps = speeds(3, {2})
    pairs = [
        PairResult(pair, (hosts[pair[0]], hosts[pair[1]]), 1 << 20, 0.1, value)
        for pair, value in gbps.items()
    ]
    text = format_pairwise(pairs, find_slow_links(gbps))
    assert "slow link: rank 2 (w-2)" in text and text.count("SLOW") == 2


def test_table_lists_factor_per_operation() -> None:
    from trainkit.comms.bench import format_table

    m = Measurement("all_reduce", 4096, 1024, "float32", 4, 1e-3, 0.004096, 0.006144)
    text = format_table([m])
    assert "all_reduce" in text and "all_reduce 1.5" in text
