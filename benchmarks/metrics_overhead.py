"""Metrics overhead: recorder cost per step, scrape cost with 8 workers, files and series after restarts.

    .venv/bin/python benchmarks/metrics_overhead.py            # ~1 minute; JSON + PNG in benchmarks/results/

Baselines measured in the same run: an empty function with step()'s signature, and prometheus_client
(single-process and its multiprocess mode, what a multi-worker exporter would otherwise use).
Goals (issue 6): step() <= 5 us and < 1% of a 10 ms step; a scrape with 8 workers < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from trainkit.metrics.slots import STEP_BUCKETS_S

RESULTS = Path(__file__).parent / "results"
NUM_WORKERS = 8
NUM_RESTARTS = 3
CALLS = 200_000  # step() calls per timing repeat
REPEATS = 7
SCRAPES = 40


def median_ns_per_call(call, calls: int = CALLS, repeats: int = REPEATS) -> float:
    for _ in range(calls // 10):  # warm-up: first touch of the pages, caches
        call(32, 512, 1.0)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            call(32, 512, 1.0)
        timings.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(timings)


def prometheus_client_step(multiprocess_dir: str | None):
    """The same per-step work done with prometheus_client metrics (one process's view)."""
    if multiprocess_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    samples = Counter("bench_samples", "samples", registry=registry)
    tokens = Counter("bench_tokens", "tokens", registry=registry)
    loss = Gauge("bench_loss", "loss", registry=registry)
    duration = Histogram(
        "bench_step_duration_seconds", "step", buckets=STEP_BUCKETS_S, registry=registry
    )
    last = [time.monotonic()]

    def step(num_samples: int, num_tokens: int | None = None, value: float | None = None) -> None:
        now = time.monotonic()
        samples.inc(num_samples)
        if num_tokens is not None:
            tokens.inc(num_tokens)
        if value is not None:
            loss.set(value)
        duration.observe(now - last[0])
        last[0] = now

    return step


def worker(kind: str, directory: str, duration_s: float) -> None:
    """A stand-in training worker stepping at ~200 Hz for ``duration_s`` (run as a subprocess)."""
    if kind == "trainkit":
        from trainkit.metrics.recorder import recorder_from_env

        step = recorder_from_env({**os.environ, "TRAINKIT_METRICS_DIR": directory}).step
    else:
        step = prometheus_client_step(directory)
    step(32, 512, 1.0)
    (Path(os.environ["BENCH_READY_DIR"]) / f"ready-{os.getpid()}").write_text("1")
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        step(32, 512, 1.0)
        time.sleep(0.005)


def measure_in_process(tmp: Path) -> dict[str, float]:
    import trainkit.metrics
    from trainkit.metrics.recorder import DisabledRecorder, Recorder
    from trainkit.world import World

    def empty(samples: int, tokens: int | None = None, loss: float | None = None) -> None:
        pass

    results = {"empty_function_ns": median_ns_per_call(empty)}
    trainkit.metrics._recorder = DisabledRecorder()
    results["trainkit_disabled_ns"] = median_ns_per_call(trainkit.metrics.step)
    (tmp / "slots").mkdir()
    trainkit.metrics._recorder = Recorder(tmp / "slots", World())
    results["trainkit_step_ns"] = median_ns_per_call(trainkit.metrics.step)
    trainkit.metrics.reset()
    results["prometheus_client_ns"] = median_ns_per_call(prometheus_client_step(None))
    # prometheus_client picks its multiprocess value class at import: measure it in a fresh process.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import metrics_overhead as m; "
        "print(m.median_ns_per_call(m.prometheus_client_step(sys.argv[2])))"
    )
    multiprocess_dir = tmp / "prom-bench"
    multiprocess_dir.mkdir()
    output = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(multiprocess_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    results["prometheus_client_multiprocess_ns"] = float(output.strip().splitlines()[-1])
    return results


def time_scrapes(url: str) -> tuple[float, int, int]:
    """Median scrape time in ms, body bytes and the number of sample lines."""
    timings, body = [], b""
    for _ in range(5):
        urllib.request.urlopen(url, timeout=10).read()
    for _ in range(SCRAPES):
        start = time.perf_counter()
        body = urllib.request.urlopen(url, timeout=10).read()
        timings.append((time.perf_counter() - start) * 1000)
    lines = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
    return statistics.median(timings), len(body), len(lines)


def start_workers(
    kind: str, directory: Path, ready_dir: Path, duration_s: float
) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINKIT_", "PROMETHEUS_"))}
    env["BENCH_READY_DIR"] = str(ready_dir)
    processes = []
    for local_rank in range(NUM_WORKERS):
        worker_env = {
            **env,
            "RANK": str(local_rank),
            "WORLD_SIZE": str(NUM_WORKERS),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(NUM_WORKERS),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", kind, str(directory), str(duration_s)],
                env=worker_env,
            )
        )
    return processes


def measure_scrapes_and_restarts(tmp: Path) -> dict[str, dict[str, float]]:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from trainkit.metrics.exporter import start_agent_exporter

    results: dict[str, dict[str, float]] = {}
    exporter = start_agent_exporter(
        0, addr="127.0.0.1", env={}, nvml_loader=lambda: (None, "benchmark")
    )
    trainkit_dir = Path(exporter.worker_env()["TRAINKIT_METRICS_DIR"])
    prom_dir = tmp / "prom-multiprocess"
    prom_dir.mkdir()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    prom_server, prom_thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    urls = {
        "trainkit": f"http://127.0.0.1:{exporter.port}/metrics",
        "prometheus_client_multiprocess": f"http://127.0.0.1:{prom_server.server_port}/metrics",
    }
    directories = {"trainkit": trainkit_dir, "prometheus_client_multiprocess": prom_dir}
    try:
        for kind, directory in directories.items():
            row: dict[str, float] = {}
            for restart in range(NUM_RESTARTS + 1):
                processes = start_workers(kind, directory, tmp, duration_s=600)
                ready = [tmp / f"ready-{process.pid}" for process in processes]
                deadline = time.monotonic() + 120
                while not all(path.exists() for path in ready):
                    assert time.monotonic() < deadline, "workers did not start within 120 s"
                    time.sleep(0.1)
                if restart == 0:
                    row["scrape_ms"], row["scrape_bytes"], row["series_first"] = time_scrapes(
                        urls[kind]
                    )
                else:
                    _, _, row["series_after_restarts"] = time_scrapes(urls[kind])
                for process in processes:  # a torchrun restart: the whole local group goes
                    process.kill()
                for process in processes:
                    process.wait()
            row["files_after_restarts"] = len(list(directory.iterdir()))
            results[kind] = row
    finally:
        exporter.close()
        prom_server.shutdown()
        prom_server.server_close()
        prom_thread.join(timeout=5)
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = results["step"]
    scrape = results["scrape"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [
        "trainkit_disabled_ns",
        "trainkit_step_ns",
        "prometheus_client_ns",
        "prometheus_client_multiprocess_ns",
    ]
    axes[0].bar(
        ["trainkit\noff", "trainkit", "prom_client", "prom_client\nmultiproc"],
        [step[n] / step["empty_function_ns"] for n in names],
        color=["#999", "#2a7", "#c63", "#c63"],
    )
    axes[0].set_title("step() cost / empty function call")
    axes[0].set_yscale("log")
    kinds = ["trainkit", "prometheus_client_multiprocess"]
    base = scrape["trainkit"]["scrape_ms"]
    axes[1].bar(
        ["trainkit", "prom_client\nmultiproc"],
        [scrape[k]["scrape_ms"] / base for k in kinds],
        color=["#2a7", "#c63"],
    )
    axes[1].set_title(f"scrape time, {NUM_WORKERS} workers (/ trainkit)")
    axes[2].bar(
        ["trainkit", "prom_client\nmultiproc"],
        [scrape[k]["files_after_restarts"] / NUM_WORKERS for k in kinds],
        color=["#2a7", "#c63"],
    )
    axes[2].set_title(f"files after {NUM_RESTARTS} restarts / workers")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("KIND", "DIR", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], float(args.worker[2]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="trainkit-metrics-bench-"))
    try:
        step = measure_in_process(tmp)
        scrape = measure_scrapes_and_restarts(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = step["empty_function_ns"]
    step_ns = step["trainkit_step_ns"]
    results = {
        "step": step,
        "step_ratio_vs_empty_function": {k: v / base for k, v in step.items()},
        "step_fraction_of_10ms": step_ns / 10e6,
        "scrape": scrape,
        "scrape_ratio_prometheus_client_vs_trainkit": scrape["prometheus_client_multiprocess"][
            "scrape_ms"
        ]
        / scrape["trainkit"]["scrape_ms"],
        "goals": {
            "step_le_5us": step_ns <= 5000,
            "step_lt_1pct_of_10ms": step_ns / 10e6 < 0.01,
            "scrape_lt_50ms": scrape["trainkit"]["scrape_ms"] < 50,
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metrics_overhead.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "metrics_overhead.png")

    print(
        f"\nper step() call (median of {REPEATS} x {CALLS:,} calls), baseline: empty function {base:.0f} ns"
    )
    print(f"{'variant':36} {'ns/call':>9} {'x empty fn':>11} {'% of 10 ms':>11}")
    for name, ns in step.items():
        print(f"{name:36} {ns:9.0f} {ns / base:11.1f} {ns / 1e5:10.4f}%")
    print(
        f"\nscrape with {NUM_WORKERS} workers; {NUM_RESTARTS} restarts of all workers (median of {SCRAPES})"
    )
    print(
        f"{'exporter':32} {'ms':>7} {'x trainkit':>11} {'series':>7} {'series after':>13} {'files after':>12}"
    )
    for kind, row in scrape.items():
        print(
            f"{kind:32} {row['scrape_ms']:7.2f} {row['scrape_ms'] / scrape['trainkit']['scrape_ms']:11.2f} "
            f"{row['series_first']:7.0f} {row['series_after_restarts']:13.0f} {row['files_after_restarts']:12.0f}"
        )
    print(f"\ngoals: {results['goals']}; wrote {RESULTS / 'metrics_overhead.json'} and .png")


if __name__ == "__main__":
    main()
