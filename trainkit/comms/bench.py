"""Collective benchmark in the manner of nccl-tests, plus a pairwise mode that names the slow link.

Runs inside a launched world (``torchrun``/``trainkit-run ... -m trainkit.comms.bench``): gloo on
CPU, nccl on GPU. Buffers are allocated once at the largest size and reused as views; every size
is warmed up before timing, and times are averaged over ranks as nccl-tests does by default.
Past 500 lines on purpose: the sweep, the pairwise mode and the report share the timing loop;
the formulas live in ``formulas.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from trainkit.comms.formulas import OPERATIONS, algbw_gbps, bus_factor, busbw_gbps
from trainkit.env_vars import APPLIED_VARIABLE
from trainkit.world import World

__all__ = [
    "ONE_POD_MESSAGE",
    "BenchConfig",
    "Measurement",
    "PairResult",
    "SlowLinkReport",
    "add_bench_arguments",
    "find_slow_links",
    "format_pairwise",
    "format_table",
    "gate_failures",
    "main",
    "parse_size",
    "run_collectives",
    "run_in_world",
    "run_pairwise",
    "size_sweep",
]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

#: What ``--pairwise`` reports when every rank runs in one pod (a pod is led by its local rank 0).
ONE_POD_MESSAGE = (
    "pairwise: the world has one pod, so there is no pod pair to measure; run it with "
    "trainkit-run across two or more pods"
)


def parse_size(text: str) -> int:
    """``"64K"``, ``"1M"``, ``"2G"`` or plain bytes (binary units, as nccl-tests' -b/-e)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"size {text!r} is not a byte count like 4096, 64K, 1M or 2G")
    return int(match.group(1)) * _UNITS[match.group(2)]


def size_sweep(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """Geometric sizes from ``min_bytes`` to ``max_bytes`` inclusive (nccl-tests' -b -e -f)."""
    if not 0 < min_bytes <= max_bytes:
        raise ValueError(f"need 0 < min_bytes ({min_bytes}) <= max_bytes ({max_bytes})")
    if factor < 2:
        raise ValueError(f"factor ({factor}) must be at least 2")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure. Defaults: every operation, 1 KiB to 16 MiB by x4, 20 timed iterations."""

    operations: tuple[str, ...] = OPERATIONS
    sizes_bytes: tuple[int, ...] = tuple(size_sweep(1 << 10, 16 << 20, 4))
    num_iterations: int = 20
    num_warmup: int = 5
    dtype: str = "float32"

    def __post_init__(self) -> None:
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown:
            raise ValueError(
                f"unknown collective(s) {unknown}; choose from {', '.join(OPERATIONS)}"
            )
        if self.num_iterations < 1 or self.num_warmup < 0:
            raise ValueError(
                f"num_iterations ({self.num_iterations}) must be >= 1 and num_warmup "
                f"({self.num_warmup}) >= 0"
            )


@dataclass(frozen=True)
class Measurement:
    operation: str
    size_bytes: int
    count: int  # elements per rank buffer as nccl-tests counts them
    dtype: str
    world_size: int
    time_s: float  # per iteration, averaged over ranks
    algbw_gbps: float
    busbw_gbps: float


@dataclass(frozen=True)
class PairResult:
    ranks: tuple[int, int]
    hosts: tuple[str, str]
    size_bytes: int
    time_s: float  # fastest exchange of the iterations, slower end of the pair
    gbps: float  # bytes each way / time: both directions run at once


@dataclass(frozen=True)
class SlowLinkReport:
    reference_gbps: float  # median over pods of each pod's best pair
    slow_pairs: tuple[tuple[int, int], ...]
    slow_pods: tuple[int, ...]  # pods whose every pair is slow: the link at fault
    pod_best_gbps: Mapping[int, float] = field(default_factory=dict)


def find_slow_links(
    pair_gbps: Mapping[tuple[int, int], float], *, threshold: float = 0.5
) -> SlowLinkReport:
    """Name slow pairs and the pods behind them from pairwise speeds (pure).

    Each pod's speed is its best pair: a throttled pod is slow with everyone, a healthy one is fast
    with at least one healthy peer. A pair (pod) is slow below ``threshold`` x the median pod speed.
    With two pods the pair can be slow but no single pod can be blamed.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold ({threshold}) must be between 0 and 1")
    pods = sorted({pod for pair in pair_gbps for pod in pair})
    best = {pod: max(gbps for pair, gbps in pair_gbps.items() if pod in pair) for pod in pods}
    if not best:
        return SlowLinkReport(0.0, (), (), {})
    reference = statistics.median(best.values())
    slow_pairs = tuple(
        sorted(pair for pair, gbps in pair_gbps.items() if gbps < threshold * reference)
    )
    slow_pods = (
        tuple(pod for pod in pods if best[pod] < threshold * reference) if len(pods) > 2 else ()
    )
    return SlowLinkReport(reference, slow_pairs, slow_pods, best)


def gate_failures(measurements: Sequence[Measurement], min_busbw_gbps: float) -> list[str]:
    """Operations whose busbw at their largest size is below the gate, as messages."""
    failures = []
    for operation in dict.fromkeys(m.operation for m in measurements):
        largest = max(
            (m for m in measurements if m.operation == operation), key=lambda m: m.size_bytes
        )
        if largest.busbw_gbps < min_busbw_gbps:
            failures.append(
                f"{operation} at {largest.size_bytes} bytes: busbw {largest.busbw_gbps:.3f} GB/s "
                f"< --min-busbw {min_busbw_gbps:g} GB/s"
            )
    return failures


# ---------------------------------------------------------------------------------------------
# Measuring (needs torch and an initialised process group)


def _sync(device: object) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def _launcher(operation: str, buffers: dict[str, object], count: int, world_size: int):
    """A zero-argument callable running ``operation`` on views of the preallocated buffers."""
    import torch.distributed as dist

    send, recv = buffers["send"], buffers["recv"]
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    chunk = count // world_size
    if operation == "all_reduce":
        view = send[:count]
        return lambda: dist.all_reduce(view)
    if operation == "broadcast":
        view = send[:count]
        return lambda: dist.broadcast(view, src=0)
    if operation == "all_gather":  # size = gathered output
        out, inp = recv[: chunk * world_size], send[:chunk]
        return lambda: gather(out, inp)
    if operation == "reduce_scatter":  # size = full input
        out, inp = recv[:chunk], send[: chunk * world_size]
        return lambda: scatter(out, inp)
    if operation == "alltoall":
        out, inp = recv[: chunk * world_size], send[: chunk * world_size]
        return lambda: dist.all_to_all_single(out, inp)
    raise AssertionError(operation)


def _element_count(operation: str, size_bytes: int, element_bytes: int, world_size: int) -> int:
    count = max(size_bytes // element_bytes, 1)
    if operation in ("all_gather", "reduce_scatter", "alltoall"):
        count = max(count // world_size, 1) * world_size
    return count


def run_collectives(config: BenchConfig, *, device: object = None) -> list[Measurement]:
    """Measure every (operation, size) in ``config`` on the default process group; all ranks call it."""
    import torch
    import torch.distributed as dist

    world_size = dist.get_world_size()
    device = device or torch.device("cpu")
    dtype = getattr(torch, config.dtype)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    max_count = max(
        _element_count(op, max(config.sizes_bytes), element_bytes, world_size)
        for op in config.operations
    )
    # One pair of buffers at the largest size, reused as views for every size (first touch is slow).
    buffers = {
        "send": torch.ones(max_count, dtype=dtype, device=device),
        "recv": torch.zeros(max_count, dtype=dtype, device=device),
    }
    results = []
    timing = torch.zeros(1, dtype=torch.float64, device=device)
    for operation in config.operations:
        for size in config.sizes_bytes:
            count = _element_count(operation, size, element_bytes, world_size)
            run = _launcher(operation, buffers, count, world_size)
            for _ in range(config.num_warmup):
                run()
            _sync(device)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(config.num_iterations):
                run()
            _sync(device)
            timing.fill_((time.perf_counter() - start) / config.num_iterations)
            dist.all_reduce(timing)
            time_s = timing.item() / world_size
            size_bytes = count * element_bytes
            results.append(
                Measurement(
                    operation=operation,
                    size_bytes=size_bytes,
                    count=count
                    if operation in ("all_reduce", "broadcast")
                    else count // world_size,
                    dtype=config.dtype,
                    world_size=world_size,
                    time_s=time_s,
                    algbw_gbps=algbw_gbps(size_bytes, time_s),
                    busbw_gbps=busbw_gbps(operation, size_bytes, time_s, world_size),
                )
            )
    return results


def run_pairwise(
    size_bytes: int = 8 << 20,
    *,
    num_iterations: int = 5,
    num_warmup: int = 1,
    device: object = None,
    world: World | None = None,
) -> list[PairResult]:
    """Time a two-way exchange between every pair of pods, one pair at a time; all ranks call it.

    ``world`` (default: the one ``trainkit.init()`` joined) tells each rank its local rank.

    A pod is represented by its local rank 0; other ranks only join the reductions. A pair's time
    is the fastest of ``num_iterations`` exchanges (the link's capacity: a CPU hiccup on a shared
    node must not brand a healthy link slow; a rate-limited link is slow in every exchange).
    """
    import torch
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = device or torch.device("cpu")
    if world is None:
        from trainkit.dist import current_world

        world = current_world() or World.from_env()
    local_rank = world.local_rank
    identity: list[object] = [None] * world_size
    dist.all_gather_object(identity, (local_rank, socket.gethostname()))
    leaders = [r for r, (lr, _) in enumerate(identity) if lr == 0]  # type: ignore[misc]
    hosts = {r: identity[r][1] for r in leaders}  # type: ignore[index]
    count = max(size_bytes // 4, 1)
    send = torch.ones(count, dtype=torch.float32, device=device)
    recv = torch.zeros(count, dtype=torch.float32, device=device)
    timing = torch.zeros(1, dtype=torch.float64, device=device)
    results = []
    for index, first in enumerate(leaders):
        for second in leaders[index + 1 :]:
            if rank in (first, second):
                peer = second if rank == first else first

                def exchange(peer: int = peer) -> None:
                    requests = [dist.isend(send, peer), dist.irecv(recv, peer)]
                    for request in requests:
                        request.wait()

                for _ in range(num_warmup):
                    exchange()
                _sync(device)
                best_s = float("inf")
                for _ in range(num_iterations):
                    start = time.perf_counter()
                    exchange()
                    _sync(device)
                    best_s = min(best_s, time.perf_counter() - start)
                timing.fill_(best_s)
            else:
                timing.zero_()
            # The slower of the two ends is the pair's time; everyone learns it.
            dist.all_reduce(timing, op=dist.ReduceOp.MAX)
            time_s = timing.item()
            results.append(
                PairResult(
                    ranks=(first, second),
                    hosts=(hosts[first], hosts[second]),
                    size_bytes=count * 4,
                    time_s=time_s,
                    gbps=count * 4 / time_s / 1e9,
                )
            )
    return results


# ---------------------------------------------------------------------------------------------
# Reporting


def format_table(measurements: Sequence[Measurement]) -> str:
    """An nccl-tests-like table: size, count, type, op, time (us), algbw, busbw (GB/s)."""
    lines = [
        f"{'size(B)':>12} {'count':>10} {'type':>8} {'op':>15} {'time(us)':>10} {'algbw':>8} {'busbw':>8}"
    ]
    for m in measurements:
        lines.append(
            f"{m.size_bytes:>12} {m.count:>10} {m.dtype:>8} {m.operation:>15} {m.time_s * 1e6:>10.1f} "
            f"{m.algbw_gbps:>8.3f} {m.busbw_gbps:>8.3f}"
        )
    if measurements:
        lines.append(
            f"# world size {measurements[0].world_size}; busbw = algbw x factor "
            + ", ".join(
                f"{op} {bus_factor(op, measurements[0].world_size):.3g}"
                for op in dict.fromkeys(m.operation for m in measurements)
            )
        )
    return "\n".join(lines)


def format_pairwise(pairs: Sequence[PairResult], report: SlowLinkReport) -> str:
    lines = [f"{'pair':>9} {'hosts':<40} {'GB/s':>8} {'x ref':>7}"]
    for pair in pairs:
        ratio = pair.gbps / report.reference_gbps if report.reference_gbps else 0.0
        flag = "  SLOW" if pair.ranks in report.slow_pairs else ""
        lines.append(
            f"{pair.ranks[0]:>4}-{pair.ranks[1]:<4} {pair.hosts[0] + ' <-> ' + pair.hosts[1]:<40} "
            f"{pair.gbps:>8.3f} {ratio:>7.2f}{flag}"
        )
    hosts = {
        rank: host for pair in pairs for rank, host in zip(pair.ranks, pair.hosts, strict=True)
    }
    if report.slow_pods:
        names = ", ".join(f"rank {pod} ({hosts[pod]})" for pod in report.slow_pods)
        lines.append(
            f"slow link: {names}: every pair with it is below half of {report.reference_gbps:.3f} GB/s"
        )
    elif report.slow_pairs:
        lines.append(f"slow pair(s) {report.slow_pairs} but no single pod is slow with everyone")
    else:
        lines.append(f"no slow link (reference {report.reference_gbps:.3f} GB/s)")
    return "\n".join(lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``python -m trainkit.comms.bench`` and ``trainkit bench collectives``."""
    parser.add_argument(
        "--ops",
        default=",".join(OPERATIONS),
        help=f"comma-separated collectives (default: {','.join(OPERATIONS)})",
    )
    parser.add_argument("-b", "--min-bytes", default="1K", help="smallest size (default 1K)")
    parser.add_argument("-e", "--max-bytes", default="16M", help="largest size (default 16M)")
    parser.add_argument(
        "-f", "--step-factor", type=int, default=4, help="size multiplier (default 4)"
    )
    parser.add_argument(
        "-n", "--iters", type=int, default=20, help="timed iterations per size (default 20)"
    )
    parser.add_argument(
        "-w", "--warmup-iters", type=int, default=5, help="untimed iterations (default 5)"
    )
    parser.add_argument("--dtype", default="float32", help="element type (default float32)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda with nccl when a GPU is visible, else cpu with gloo",
    )
    parser.add_argument(
        "--min-busbw",
        type=float,
        default=None,
        metavar="GBPS",
        help="gate: exit 1 when an operation's busbw at the largest size (pairwise: "
        "a pair's GB/s) is below this",
    )
    parser.add_argument(
        "--pairwise",
        action="store_true",
        help="measure every pod pair (one process per pod leads) and name the slow link",
    )
    parser.add_argument(
        "--pair-bytes", default="8M", help="bytes each way per pairwise exchange (default 8M)"
    )
    parser.add_argument(
        "--slow-threshold",
        type=float,
        default=0.5,
        help="a pair/pod is slow below this fraction of the median pod speed (default 0.5)",
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="rank 0 writes results here as JSON"
    )
    # For `trainkit bench collectives` standalone: a failed gate is a result, not a crashed rank,
    # so the ranks exit 0 and the parent exits 1 from the JSON (torchrun would print a traceback).
    parser.add_argument("--gate-in-json", action="store_true", help=argparse.SUPPRESS)


def run_in_world(args: argparse.Namespace) -> int:
    """Join the launched world, run the sweep (or pairwise mode), print and write on rank 0.

    Returns 1 when ``--min-busbw`` is given and not met (``--pairwise`` in one pod never meets it),
    else 0; every rank returns the same code. With ``--gate-in-json`` the verdict is only written.
    """
    import torch

    import trainkit

    # Validate flags before joining, so a typo fails fast on every rank.
    if args.gate_in_json and not args.json_path:
        raise SystemExit("--gate-in-json needs --json PATH: the verdict is written there")
    pair_bytes = parse_size(args.pair_bytes)
    config = BenchConfig(
        operations=tuple(op.strip() for op in args.ops.split(",") if op.strip()),
        sizes_bytes=tuple(
            size_sweep(parse_size(args.min_bytes), parse_size(args.max_bytes), args.step_factor)
        ),
        num_iterations=args.iters,
        num_warmup=args.warmup_iters,
        dtype=args.dtype,
    )
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    world = trainkit.init(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    document: dict[str, object] = {
        "world_size": world.world_size,
        "backend": "nccl" if use_cuda else "gloo",
        "environment": {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith(("NCCL_", "TORCH_NCCL_", "FI_", "GLOO_", APPLIED_VARIABLE))
        },
    }
    failures: list[str] = []
    try:
        if args.pairwise:
            pairs = run_pairwise(
                pair_bytes,
                num_iterations=args.iters,
                num_warmup=args.warmup_iters,
                device=device,
                world=world,
            )
            report = find_slow_links(
                {p.ranks: p.gbps for p in pairs}, threshold=args.slow_threshold
            )
            document.update(pairs=[asdict(p) for p in pairs], slow_links=asdict(report))
            text = format_pairwise(pairs, report) if pairs else ONE_POD_MESSAGE
            if args.min_busbw is not None:
                failures = [
                    f"pair {p.ranks} ({p.hosts[0]} <-> {p.hosts[1]}): {p.gbps:.3f} GB/s "
                    f"< --min-busbw {args.min_busbw:g} GB/s"
                    for p in pairs
                    if p.gbps < args.min_busbw
                ]
                if not pairs:  # a gate that measured nothing must not pass
                    failures = [f"no pod pair to check against --min-busbw {args.min_busbw:g}"]
        else:
            measurements = run_collectives(config, device=device)
            document["measurements"] = [asdict(m) for m in measurements]
            text = format_table(measurements)
            if args.min_busbw is not None:
                failures = gate_failures(measurements, args.min_busbw)
        if args.min_busbw is not None:
            document["gate"] = {"min_busbw_gbps": args.min_busbw, "failures": failures}
            if failures:
                text += "\nGATE FAILED: " + "; ".join(failures)
        if world.is_main:
            print(text, flush=True)
            if args.json_path:
                with open(args.json_path, "w") as handle:
                    json.dump(document, handle, indent=2)
    finally:
        trainkit.shutdown()
    return 1 if failures and not args.gate_in_json else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trainkit.comms.bench`` inside a launched world."""
    parser = argparse.ArgumentParser(prog="python -m trainkit.comms.bench", description=__doc__)
    add_bench_arguments(parser)
    return run_in_world(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
