"""Throughput of shards against raw pyarrow on a generated token dataset: one epoch into a trivial loop.

    python benchmarks/shards_throughput.py                       # 200k rows x 512 int32 + int64 label (~410 MB)
    python benchmarks/shards_throughput.py --rows 50000 --repeats 1   # a quick look
    python benchmarks/shards_throughput.py --no-peers            # trainkit and pyarrow only

Peers (MosaicML Streaming, LitData) run from their own venv, .venv-peers (torch 2.14.1 +
torchvision 0.29.1, then `pip install --no-deps mosaicml-streaming litdata` and their
dependencies; never the project's own), each on a copy of the same rows converted once to its format and cached
beside the dataset; without that venv they are reported as skipped, with the reason.
Every configuration runs in its own process (peak anonymous memory is sampled there, children
included); figures are medians over --repeats and ratios against baselines measured in this run.
Cold page cache is made with posix_fadvise(DONTNEED) on each file, no root needed. Writes JSON + PNG
under benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PEERS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"
# peer -> its configuration in CONFIGS; each is timed with its own default shuffle on
PEERS = {"mosaicml-streaming": "streaming_shuffled_w2", "litdata": "litdata_shuffled_w0"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the generated dataset")
    parser.add_argument("--width", type=int, default=512, help="int32 tokens per row")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    parser.add_argument(
        "--repeats", type=int, default=3, help="epochs per configuration (median taken)"
    )
    parser.add_argument(
        "--readahead-mib", type=int, default=64, help="trainkit readahead budget per process"
    )
    parser.add_argument(
        "--workdir", default="/tmp/shards-bench", help="where the dataset is written"
    )
    parser.add_argument("--only", default=None, help="comma-separated configuration names to run")
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the peer loaders (default: when .venv-peers exists)",
    )
    parser.add_argument(
        "--run-one", default=None, help=argparse.SUPPRESS
    )  # internal: child process
    return parser.parse_args(argv)


# -- memory sampling ---------------------------------------------------------------------------------
def _anon_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _private_dirty_bytes(pid: int) -> int:
    """Pages a forked child wrote itself (its copy-on-write share of the parent is not counted)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _tree_anon_bytes() -> int:
    me = os.getpid()
    try:
        children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    except FileNotFoundError:
        children = []
    return _anon_bytes(me) + sum(_private_dirty_bytes(int(child)) for child in children)


class MemorySampler:
    def __init__(self) -> None:
        self.base = _tree_anon_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _tree_anon_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def drop_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- configurations (run in a child process) ---------------------------------------------------------
def shard_paths(url: str) -> list[str]:
    from shards import Manifest

    manifest = Manifest.load(url)
    return [os.path.join(url, shard.path) for shard in manifest.shards]


def run_pyarrow_sequential(url: str, batch_size: int, **_):
    """The ceiling: memory-mapped IPC, record batches in file order, copied into owned tensors."""
    import numpy as np
    import pyarrow as pa
    import torch

    for path in shard_paths(url):
        reader = pa.ipc.open_file(pa.memory_map(path))
        for index in range(reader.num_record_batches):
            record = reader.get_batch(index)
            for start in range(0, record.num_rows, batch_size):
                part = record.slice(start, batch_size)
                tokens = part.column("tokens")
                width = tokens.type.list_size
                yield {
                    "tokens": torch.from_numpy(
                        np.array(tokens.flatten().to_numpy().reshape(-1, width))
                    ),
                    "label": torch.from_numpy(np.array(part.column("label").to_numpy())),
                }


def run_pyarrow_shuffle(url: str, batch_size: int, **_):
    """Permuted shards, a 4-shard buffer combined then permuted with ``take``."""
    import numpy as np
    import pyarrow as pa
    import torch

    rng = np.random.default_rng(_.get("epoch", 0))
    paths = shard_paths(url)
    order = rng.permutation(len(paths))
    for first in range(0, len(paths), 4):
        tables = [
            pa.ipc.open_file(pa.memory_map(paths[i])).read_all() for i in order[first : first + 4]
        ]
        buffer = pa.concat_tables(tables).combine_chunks()
        perm = rng.permutation(buffer.num_rows)
        for start in range(0, buffer.num_rows, batch_size):
            part = buffer.take(pa.array(perm[start : start + batch_size]))
            tokens = part.column("tokens").combine_chunks()
            width = tokens.type.list_size
            yield {
                "tokens": torch.from_numpy(tokens.flatten().to_numpy().reshape(-1, width)),
                "label": torch.from_numpy(part.column("label").to_numpy()),
            }


def run_trainkit(
    url: str,
    batch_size: int,
    shuffle: bool,
    workers: int,
    readahead_bytes: int,
    epoch: int,
    verify: bool = True,
    verify_marks: bool = True,
    **_,
):
    from shards import RankWorld, ReadOptions, ShardedDataset, ShardedLoader

    # built once per process, as a training script does; each epoch is set_epoch + one pass
    key = (url, batch_size, shuffle, readahead_bytes, verify, verify_marks)
    dataset = _DATASETS.get(key)
    if dataset is None:
        dataset = _DATASETS[key] = ShardedDataset(
            url,
            batch_size=batch_size,
            shuffle=shuffle,
            world=RankWorld(0, 1),
            read_options=ReadOptions(
                readahead_bytes=readahead_bytes, verify=verify, verify_marks=verify_marks
            ),
        )
    dataset.set_epoch(epoch)
    return iter(ShardedLoader(dataset, num_workers=workers))


_DATASETS: dict[tuple, object] = {}


# -- peers (run in a child process under .venv-peers; they never import trainkit) ---------------------
def peer_dir(url: str, kind: str) -> str:
    return f"{url}-{kind}"


def _arrow_rows(paths: list[str]):
    """Rows of the trainkit shards as (tokens, label), read with pyarrow only."""
    import numpy as np
    import pyarrow as pa

    for path in paths:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all().combine_chunks()
        tokens = table.column("tokens").combine_chunks()
        width = tokens.type.list_size
        matrix = tokens.flatten().to_numpy().reshape(-1, width)
        labels = table.column("label").to_numpy()
        for row in range(len(labels)):
            yield np.ascontiguousarray(matrix[row]), int(labels[row])


def convert_for_peer(kind: str, url: str, paths: list[str]) -> dict:
    """Write the same rows in the peer's format once; a marker file makes the copy reusable."""
    out = peer_dir(url, kind)
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        return {"seconds": 0.0, "cached": True}
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if kind == "streaming":
        from streaming import MDSWriter

        width = None
        with MDSWriter(
            out=out, columns={"tokens": "ndarray", "label": "int64"}, size_limit=1 << 26
        ) as writer:
            for tokens, label in _arrow_rows(paths):
                width = len(tokens)
                writer.write({"tokens": tokens, "label": label})
    else:
        from litdata.streaming.cache import Cache

        cache = Cache(out, chunk_bytes="64MB")
        for index, (tokens, label) in enumerate(_arrow_rows(paths)):
            cache[index] = {"tokens": tokens, "label": label}
        cache.done()
        cache.merge()
        width = None
    Path(marker).write_text(str(width))
    return {"seconds": time.perf_counter() - started, "cached": False}


def run_streaming(url: str, batch_size: int, workers: int, **_):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    key = ("streaming", url, batch_size, workers)
    loader = _DATASETS.get(key)
    if loader is None:
        clean_stale_shared_memory()  # a previous process's leftovers make the constructor fail
        dataset = StreamingDataset(
            local=peer_dir(url, "streaming"), shuffle=True, batch_size=batch_size
        )
        loader = _DATASETS[key] = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
        )
    return iter(loader)


def run_litdata(url: str, batch_size: int, workers: int, **_):
    from litdata import StreamingDataLoader, StreamingDataset

    key = ("litdata", url, batch_size, workers)
    loader = _DATASETS.get(key)
    if loader is None:
        dataset = StreamingDataset(input_dir=peer_dir(url, "litdata"), shuffle=True)
        loader = _DATASETS[key] = StreamingDataLoader(
            dataset, batch_size=batch_size, num_workers=workers
        )
    return iter(loader)


CONFIGS = {
    "pyarrow_sequential": dict(kind="pyarrow_sequential"),
    "pyarrow_shuffle_take": dict(kind="pyarrow_shuffle"),
    "trainkit_unshuffled_w0": dict(kind="trainkit", shuffle=False, workers=0),
    "trainkit_shuffled_w0": dict(kind="trainkit", shuffle=True, workers=0),
    "trainkit_unshuffled_w2": dict(kind="trainkit", shuffle=False, workers=2),
    "trainkit_shuffled_w2": dict(kind="trainkit", shuffle=True, workers=2),
    "trainkit_shuffled_w0_cold": dict(kind="trainkit", shuffle=True, workers=0, cold=True),
    "trainkit_unshuffled_w0_cold": dict(kind="trainkit", shuffle=False, workers=0, cold=True),
    # the cost of integrity: every row group checksummed on every read, and no check at all
    "trainkit_shuffled_w0_check_every_read": dict(
        kind="trainkit", shuffle=True, workers=0, verify_marks=False
    ),
    "trainkit_shuffled_w0_no_checks": dict(kind="trainkit", shuffle=True, workers=0, verify=False),
    "disk_sequential_cold": dict(kind="disk", cold=True),
    # peers, in .venv-peers; Streaming's 2 workers pinned to one core ran faster than on two here
    "streaming_shuffled_w2": dict(kind="streaming", shuffle=True, workers=2, peer=True, pin=True),
    "litdata_shuffled_w0": dict(kind="litdata", shuffle=True, workers=0, peer=True),
}


def disk_sequential_read(url: str) -> tuple[float, int]:
    """Seconds and bytes to read every shard file in 8 MiB sequential reads (cold cache)."""
    paths = shard_paths(url)
    drop_page_cache(paths)
    buffer = bytearray(8 << 20)
    total, started = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return time.perf_counter() - started, total


def run_one(spec: dict) -> dict:
    """One warm-up epoch, then ``repeats`` timed epochs in this process (cold: cache dropped before each)."""
    import numpy as np  # noqa: F401  (imports are not data loading: keep them out of the timings)
    import pyarrow.parquet  # noqa: F401
    import torch

    url, config = spec["url"], CONFIGS[spec["name"]]
    if config["kind"] == "streaming":
        import streaming  # noqa: F401
    elif config["kind"] == "litdata":
        import litdata  # noqa: F401
    else:
        import shards.loader  # noqa: F401  (imports shards.dataset too)

    torch.set_num_threads(1)
    if spec.get("convert"):
        return convert_for_peer(config["kind"], url, spec["shard_paths"])
    if config["kind"] == "disk":
        runs = [disk_sequential_read(url) for _ in range(spec["repeats"])]
        return {"seconds": [r[0] for r in runs], "bytes": runs[0][1]}
    runner = {
        "pyarrow_sequential": run_pyarrow_sequential,
        "pyarrow_shuffle": run_pyarrow_shuffle,
        "trainkit": run_trainkit,
        "streaming": run_streaming,
        "litdata": run_litdata,
    }[config["kind"]]
    seconds, first_batch, samples = [], [], 0
    sampler = MemorySampler()
    for epoch in range(spec["repeats"] + 1):
        if config.get("cold"):
            drop_page_cache(shard_paths(url))
        started = time.perf_counter()
        batches = runner(
            url,
            spec["batch_size"],
            shuffle=config.get("shuffle"),
            workers=config.get("workers"),
            readahead_bytes=spec["readahead_bytes"],
            epoch=epoch,
            verify=config.get("verify", True),
            verify_marks=config.get("verify_marks", True),
        )
        samples, first_batch_s, checksum = 0, None, 0
        for batch in batches:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
            samples += len(batch["label"])
            checksum += int(batch["label"][0])  # the trivial loop: touch the batch
        if epoch:  # epoch 0 warms imports, allocator and (warm configurations) the page cache
            seconds.append(time.perf_counter() - started)
            first_batch.append(first_batch_s)
        else:
            startup_s = first_batch_s  # opening the dataset and the first batch of the first epoch
    return {
        "seconds": seconds,
        "first_batch_s": first_batch,
        "startup_s": startup_s,
        "samples": samples,
        "peak_anon_bytes": sampler.stop(),
    }


# -- driver ------------------------------------------------------------------------------------------
def make_dataset(args) -> tuple[str, int]:
    import numpy as np
    import pyarrow as pa

    from shards import Manifest, write_shards

    url = os.path.join(args.workdir, f"tokens-{args.rows}x{args.width}")
    try:
        manifest = Manifest.load(url)
        return url, manifest.num_bytes
    except Exception:
        pass
    rng = np.random.default_rng(0)

    def batches():
        for start in range(0, args.rows, 10_000):
            rows = min(10_000, args.rows - start)
            tokens = rng.integers(0, 50_000, size=(rows, args.width), dtype=np.int32)
            yield pa.record_batch(
                {
                    "tokens": pa.FixedSizeListArray.from_arrays(
                        pa.array(tokens.ravel()), args.width
                    ),
                    "label": pa.array(np.arange(start, start + rows, dtype=np.int64)),
                }
            )

    manifest = write_shards(
        batches(), url, format="arrow", bytes_per_shard=32 << 20, progress=False, overwrite=True
    )
    return url, manifest.num_bytes


class PeerFailed(RuntimeError):
    """A peer configuration failed; the peer is reported as skipped with this reason."""


def run_config(name: str, spec: dict) -> dict:
    config = CONFIGS[name]
    command = [sys.executable, __file__, "--run-one", json.dumps({**spec, "name": name})]
    env = None
    if config.get("peer"):
        command[0] = str(PEERS_PYTHON)
        env = {**os.environ, "LITDATA_DISABLE_VERSION_CHECK": "1"}  # no package-index call
        if config.get("pin"):
            command = ["taskset", "-c", "0", *command]
    try:
        child = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600 if config.get("peer") else 300,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        if config.get("peer"):
            raise PeerFailed(f"{name} ran past {error.timeout:.0f} s") from error
        raise
    if child.returncode != 0:
        if config.get("peer"):
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeerFailed(f"{name} exited {child.returncode}: {last[:300]}")
        raise RuntimeError(f"{name} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def prepare_peers(names: list[str], spec: dict, want: bool | None) -> dict[str, str]:
    """Convert the dataset for each peer once; returns peer -> skip reason for those that cannot run."""
    skipped: dict[str, str] = {}
    for peer, name in PEERS.items():
        if name not in names:
            skipped[peer] = "skipped: not selected by --only"
        elif want is False:
            skipped[peer] = "skipped: --no-peers"
        elif not PEERS_PYTHON.exists():
            skipped[peer] = f"skipped: {PEERS_PYTHON} not found (install recipe in PEERS.md)"
    for peer, name in PEERS.items():
        if peer in skipped:
            continue
        try:
            conversion = run_config(name, {**spec, "convert": True, "repeats": 0})
        except PeerFailed as error:
            skipped[peer] = f"skipped: conversion failed: {error}"
            continue
        spec.setdefault("peer_conversion_s", {})[peer] = conversion
    return skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    url, dataset_bytes = make_dataset(args)
    spec = {"url": url, "batch_size": args.batch_size, "readahead_bytes": args.readahead_mib << 20}
    names = args.only.split(",") if args.only else list(CONFIGS)
    spec["shard_paths"] = shard_paths(url)
    peer_skipped = prepare_peers(names, spec, args.peers)
    conversions = spec.pop("peer_conversion_s", {})
    names = [n for n in names if not any(PEERS[p] == n for p in peer_skipped)]
    results: dict[str, dict] = {}
    # Rounds interleave the configurations, so slow phases of a shared machine hit all of them alike;
    # each child runs a warm-up epoch and two timed epochs.
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        for name in list(names):
            try:
                runs[name].append(run_config(name, {**spec, "repeats": 2}))
            except PeerFailed as error:
                peer = next(p for p, n in PEERS.items() if n == name)
                peer_skipped[peer] = f"skipped: {error}"
                names.remove(name)
        print(f"  round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    for name in names:
        seconds_all = [s for run in runs[name] for s in run["seconds"]]
        seconds = statistics.median(seconds_all)
        if CONFIGS[name]["kind"] == "disk":
            results[name] = {"seconds": seconds, "bytes_per_s": runs[name][0]["bytes"] / seconds}
            continue
        samples = runs[name][0]["samples"]
        results[name] = {
            "seconds": seconds,
            "samples": samples,
            "samples_per_s": samples / seconds,
            "bytes_per_s": dataset_bytes * samples / args.rows / seconds,
            "first_batch_s": statistics.median(
                f for run in runs[name] for f in run["first_batch_s"]
            ),
            "startup_first_batch_s": statistics.median(run["startup_s"] for run in runs[name]),
            "peak_anon_mib": max(run["peak_anon_bytes"] for run in runs[name]) / 2**20,
            "all_seconds": seconds_all,
        }

    ceiling = results.get("pyarrow_sequential", {}).get("samples_per_s")
    shuffled_baseline = results.get("pyarrow_shuffle_take", {}).get("samples_per_s")
    disk = results.get("disk_sequential_cold", {}).get("bytes_per_s")
    for result in results.values():
        if "samples_per_s" in result:
            result["vs_pyarrow_sequential"] = result["samples_per_s"] / ceiling if ceiling else None
            result["vs_pyarrow_shuffle"] = (
                result["samples_per_s"] / shuffled_baseline if shuffled_baseline else None
            )
            result["vs_disk_sequential"] = result["bytes_per_s"] / disk if disk else None
    peers = peer_report(results, peer_skipped, conversions)
    report = {
        "dataset": {
            "rows": args.rows,
            "width": args.width,
            "bytes": dataset_bytes,
            "batch_size": args.batch_size,
        },
        "readahead_budget_mib": args.readahead_mib,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "results": results,
        "peers": peers,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shards_throughput.json").write_text(json.dumps(report, indent=1))
    print_table(results, disk, peers)
    plot(results)
    return 0


def peer_report(results: dict, skipped: dict[str, str], conversions: dict) -> dict:
    """Per peer: its configuration and trainkit shuffled / peer (the goal is >= 5x), or why skipped."""
    report: dict = {}
    for peer, name in PEERS.items():
        if peer in skipped or name not in results:
            report[peer] = skipped.get(peer, "skipped: no result")
            continue
        peer_rate = results[name]["samples_per_s"]
        report[peer] = {
            "configuration": name,
            "samples_per_s": peer_rate,
            "conversion": conversions.get(peer),
            **{
                f"{tk}_over_peer": results[tk]["samples_per_s"] / peer_rate
                for tk in ("trainkit_shuffled_w0", "trainkit_shuffled_w2")
                if tk in results
            },
        }
    measured = [r for r in report.values() if isinstance(r, dict)]
    if measured and "trainkit_shuffled_w0" in results:
        best = max(measured, key=lambda r: r["samples_per_s"])
        report["trainkit_shuffled_w0_over_best_peer"] = (
            results["trainkit_shuffled_w0"]["samples_per_s"] / best["samples_per_s"]
        )
        report["best_peer_configuration"] = best["configuration"]
    return report


def print_table(results: dict, disk: float | None, peers: dict) -> None:
    print(
        f"{'configuration':<30}{'samples/s':>12}{'vs seq':>8}{'vs shuf':>9}{'vs disk':>9}{'1st batch':>11}{'peak MiB':>10}"
    )
    for name, r in results.items():
        if "samples_per_s" not in r:
            print(
                f"{name:<30}{'':>12}{'':>8}{'':>9}{'':>9}{'':>11}{'':>10}  {r['bytes_per_s'] / 1e9:.2f} GB/s"
            )
            continue

        def ratio(value):
            return f"{value:.2f}x" if value else "-"

        print(
            f"{name:<30}{r['samples_per_s']:>12,.0f}{ratio(r['vs_pyarrow_sequential']):>8}"
            f"{ratio(r['vs_pyarrow_shuffle']):>9}{ratio(r['vs_disk_sequential']):>9}"
            f"{r['first_batch_s'] * 1000:>9.1f}ms{r['peak_anon_mib']:>10.1f}"
        )
    for peer in PEERS:
        if isinstance(peers.get(peer), str):
            print(f"{peer:<30}{peers[peer]}")
        else:
            ratios = ", ".join(
                f"{key.removesuffix('_over_peer')} {value:.1f}x"
                for key, value in peers[peer].items()
                if key.endswith("_over_peer")
            )
            print(f"{peer:<30}trainkit / {peer}: {ratios or 'no trainkit shuffled run to compare'}")
    if "trainkit_shuffled_w0_over_best_peer" in peers:
        print(
            f"trainkit shuffled w0 / best peer ({peers['best_peer_configuration']}): "
            f"{peers['trainkit_shuffled_w0_over_best_peer']:.1f}x (goal >= 5x)"
        )


def plot(results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    names = [n for n, r in results.items() if r.get("vs_pyarrow_shuffle")]
    values = [results[n]["vs_pyarrow_shuffle"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {"pyarrow": "#888", "streaming": "#c63", "litdata": "#c63"}
    ax.barh(names, values, color=[colors.get(n.split("_")[0], "#2a6") for n in names])
    ax.set_xscale("log")  # peers sit 10-100x below trainkit: a linear axis hides them
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("samples/s relative to raw pyarrow shuffled read (same run, log scale)")
    ax.set_title("shards: one epoch, 512 x int32 tokens + int64 label")
    fig.tight_layout()
    fig.savefig(RESULTS / "shards_throughput.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
