"""Collective bandwidth against the link it runs on, measured in the same run.

    python benchmarks/collectives.py                 # 2 gloo ranks on loopback, 64K..16M, 3 repeats
    python benchmarks/collectives.py --nproc 4 --repeats 5
    sudo python benchmarks/collectives.py --netns-pods 4   # also: pairwise across namespace pods,
                                                           # one of them throttled with tc

Baseline: a full-duplex TCP exchange between two plain processes over the same loopback, with the
same bytes each way (what one ring step can move at best); broadcast, which moves data one way,
is compared with one-way TCP. Figure: busbw / baseline per operation
and size; nccl-tests' busbw is defined so that 1.0 means "the collective used the link fully".
Writes benchmarks/results/collectives.{json,png} and prints a table. Repeats are interleaved
(baseline, benchmark, baseline, ...) and medians reported, as this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainkit.comms.bench import parse_size, size_sweep  # noqa: E402


def _exchange(sock: socket.socket, send: memoryview, recv: memoryview) -> None:
    """Send all of ``send`` while receiving all of ``recv`` (full duplex)."""
    sender = threading.Thread(target=sock.sendall, args=(send,))
    sender.start()
    got = 0
    while got < len(recv):
        got += sock.recv_into(recv[got:])
    sender.join()


def _receive(sock: socket.socket, recv: memoryview) -> None:
    got = 0
    while got < len(recv):
        got += sock.recv_into(recv[got:])


def _peer(port: int, sizes: list[int], iterations: int) -> None:
    buffers = bytearray(max(sizes)), bytearray(max(sizes))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in sizes:
            for _ in range(iterations + 2):
                _exchange(sock, memoryview(buffers[0])[:size], memoryview(buffers[1])[:size])
            for _ in range(iterations + 2):  # one way: receive everything, then a 1-byte ack
                _receive(sock, memoryview(buffers[1])[:size])
                sock.sendall(b"k")


def measure_baseline(
    sizes: list[int], iterations: int
) -> tuple[dict[int, float], dict[int, float]]:
    """GB/s of TCP between two processes per size, medians: (each way of a full-duplex exchange, one way)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        peer = multiprocessing.get_context("spawn").Process(
            target=_peer, args=(port, sizes, iterations)
        )
        peer.start()
        connection, _ = server.accept()
    send, recv = (
        bytearray(max(sizes)),
        bytearray(max(sizes)),
    )  # allocated once, reused for every size
    duplex, one_way = {}, {}
    ack = memoryview(bytearray(1))
    with connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in sizes:
            times = []
            for iteration in range(iterations + 2):  # two warm-ups: first touch, TCP window growth
                start = time.perf_counter()
                _exchange(connection, memoryview(send)[:size], memoryview(recv)[:size])
                if iteration >= 2:
                    times.append(time.perf_counter() - start)
            duplex[size] = size / statistics.median(times) / 1e9
            times = []
            for iteration in range(iterations + 2):
                start = time.perf_counter()
                connection.sendall(memoryview(send)[:size])
                _receive(connection, ack)
                if iteration >= 2:
                    times.append(time.perf_counter() - start)
            one_way[size] = size / statistics.median(times) / 1e9
    peer.join(timeout=30)
    return duplex, one_way


def measure_collectives(
    nproc: int, min_bytes: str, max_bytes: str, factor: int, iterations: int
) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "bench.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
        env["OMP_NUM_THREADS"] = "1"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "trainkit.comms.bench",
            "-b",
            min_bytes,
            "-e",
            max_bytes,
            "-f",
            str(factor),
            "-n",
            str(iterations),
            "-w",
            "3",
            "--json",
            out,
        ]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as handle:
            return json.load(handle)["measurements"]


def measure_pairwise_netns(num_pods: int, rate: str, pair_bytes: str, iterations: int) -> dict:
    """Pairwise mode across namespace pods (tests/integration/podnet.py), the last pod throttled."""
    from tests.integration.podnet import PodNet

    with PodNet() as net, tempfile.TemporaryDirectory() as directory:
        pods = [net.add_pod(f"w-{i}") for i in range(num_pods)]
        throttled = pods[-1]
        index = throttled.name.rsplit("-", 1)[1]
        tbf = ["root", "tbf", "rate", rate, "burst", "32kb", "latency", "100ms"]
        subprocess.run(["tc", "qdisc", "add", "dev", f"tkv{net.uid}{index}", *tbf], check=True)
        subprocess.run(
            ["ip", "netns", "exec", throttled.name, "tc", "qdisc", "add", "dev", "eth0", *tbf],
            check=True,
        )
        out = os.path.join(directory, "pairs.json")
        processes = [
            pod.spawn(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    str(num_pods),
                    "--node-rank",
                    str(node),
                    "--nproc-per-node",
                    "1",
                    "--master-addr",
                    pods[0].ip,
                    "--master-port",
                    "29620",
                    "-m",
                    "trainkit.comms.bench",
                    "--pairwise",
                    "--pair-bytes",
                    pair_bytes,
                    "-n",
                    str(iterations),
                    "-w",
                    "1",
                    "--json",
                    out,
                ],
                env={"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL,
            )
            for node, pod in enumerate(pods)
        ]
        codes = [process.wait(timeout=300) for process in processes]
        if codes != [0] * num_pods:
            raise RuntimeError(f"pairwise run failed in the pods: exit codes {codes}")
        with open(out) as handle:
            document = json.load(handle)
    document["throttled_rank"], document["rate"] = num_pods - 1, rate
    return document


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--min-bytes", default="64K")
    parser.add_argument("--max-bytes", default="16M")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument(
        "--iters", type=int, default=10, help="timed iterations per size (default 10)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats; medians reported"
    )
    parser.add_argument(
        "--netns-pods",
        type=int,
        default=0,
        help="also run pairwise mode across this many namespace pods, the last one throttled "
        "with tc (needs root; 0: skip)",
    )
    parser.add_argument("--throttle", default="80mbit", help="tc tbf rate for the throttled pod")
    args = parser.parse_args()

    sizes = size_sweep(parse_size(args.min_bytes), parse_size(args.max_bytes), args.factor)
    baselines: dict[int, list[float]] = {size: [] for size in sizes}
    one_way_runs: dict[int, list[float]] = {size: [] for size in sizes}
    collected: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        duplex, one_way = measure_baseline(sizes, args.iters)
        for size in sizes:
            baselines[size].append(duplex[size])
            one_way_runs[size].append(one_way[size])
        for m in measure_collectives(
            args.nproc, args.min_bytes, args.max_bytes, args.factor, args.iters
        ):
            collected.setdefault((m["operation"], m["size_bytes"]), []).append(m["busbw_gbps"])

    baseline = {size: statistics.median(values) for size, values in baselines.items()}
    baseline_one_way = {size: statistics.median(values) for size, values in one_way_runs.items()}
    rows = []
    for (operation, size), values in collected.items():
        # all_gather/reduce_scatter/alltoall sizes are rounded to whole chunks; compare to the nearest size.
        # Broadcast moves data one way only; the others send and receive at once on every rank.
        table = baseline_one_way if operation == "broadcast" else baseline
        reference = table[min(table, key=lambda s: abs(s - size))]
        busbw = statistics.median(values)
        rows.append(
            {
                "operation": operation,
                "size_bytes": size,
                "busbw_gbps": busbw,
                "baseline_gbps": reference,
                "ratio": busbw / reference,
                "repeats": values,
            }
        )
    print(
        f"gloo, {args.nproc} ranks on loopback; baseline = TCP between two processes, the same bytes "
        f"(broadcast: one way; others: full-duplex exchange), medians of {args.repeats}"
    )
    print(f"{'op':>15} {'size':>10} {'busbw GB/s':>11} {'TCP GB/s':>9} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['operation']:>15} {row['size_bytes']:>10} {row['busbw_gbps']:>11.3f} "
            f"{row['baseline_gbps']:>9.3f} {row['ratio']:>6.2f}"
        )

    pairwise = None
    if args.netns_pods:
        pairwise = measure_pairwise_netns(args.netns_pods, args.throttle, "1M", 5)
        report = pairwise["slow_links"]
        print(
            f"\npairwise across {args.netns_pods} namespace pods, rank {pairwise['throttled_rank']} "
            f"throttled to {args.throttle}; ratio = pair GB/s / median pod speed"
        )
        print(f"{'pair':>7} {'GB/s':>8} {'ratio':>7}")
        for pair in pairwise["pairs"]:
            ratio = pair["gbps"] / report["reference_gbps"]
            flag = "  SLOW" if pair["ranks"] in report["slow_pairs"] else ""
            print(
                f"{pair['ranks'][0]:>3}-{pair['ranks'][1]:<3} {pair['gbps']:>8.4f} {ratio:>7.3f}{flag}"
            )
        print(f"slow pods named: {report['slow_pods']} (throttled: {pairwise['throttled_rank']})")

    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "nproc": args.nproc,
        "backend": "gloo",
        "transport": "loopback TCP",
        "repeats": args.repeats,
        "iterations": args.iters,
        "baseline": "TCP between two processes: full-duplex exchange (GB/s each way); broadcast "
        "compared with one-way TCP",
        "baseline_gbps": {str(k): v for k, v in baseline.items()},
        "baseline_one_way_gbps": {str(k): v for k, v in baseline_one_way.items()},
        "rows": rows,
    }
    (RESULTS / "collectives.json").write_text(json.dumps(document, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: wrote JSON only (pip install matplotlib for the PNG)")
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for operation in dict.fromkeys(row["operation"] for row in rows):
        points = sorted((r["size_bytes"], r["ratio"]) for r in rows if r["operation"] == operation)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=operation)
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("size (bytes, nccl-tests convention)")
    axis.set_ylabel("busbw / TCP bandwidth (same bytes)")
    axis.set_title(f"gloo collectives, {args.nproc} ranks, loopback (median of {args.repeats})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "collectives.png", dpi=120)
    print(f"wrote {RESULTS / 'collectives.json'} and {RESULTS / 'collectives.png'}")


if __name__ == "__main__":
    main()
