"""Token windows (shards.TokenWindowDataset) against LitData's TokensLoader and nanoGPT's memmap on one
token stream, then write_shards on Hugging Face sources: time and peak memory.

    python benchmarks/tokens_throughput.py                          # 32M tokens, block 512, batch 16
    python benchmarks/tokens_throughput.py --tokens 4000000 --repeats 1   # a quick look
    python benchmarks/tokens_throughput.py --no-peers               # without LitData
    python benchmarks/tokens_throughput.py --only-write --before-root /tmp/old-checkout

Sections:
- windows: one epoch of windows of block + 1 tokens into a trivial loop. Baselines in the same run:
  pyarrow reading the shards in order and slicing windows (the ceiling), and nanoGPT's get_batch
  (random offsets into a flat np.memmap, not exactly-once). LitData (``TokensLoader(block_size=
  block + 1)``, its stride is block + 1: every block + 1-th token is never a target) runs from
  .venv-peers (recipe in benchmarks/README.md) on the same tokens converted once to its format.
- hf_write: write_shards(datasets.Dataset) against write_shards(its Arrow table), and against the
  rows-as-dicts path write_shards took before it knew datasets.Dataset (``iter(dataset)``).
- write_rss: peak RSS growth of write_shards on a ~300 MB Parquet file and a ~300 MB Arrow stream
  (the datasets cache layout), against a raw pyarrow copy of the same file a record batch at a time;
  ``--before-root`` also measures another checkout of this repository (e.g. the previous commit).
Every configuration runs in its own process; figures are medians over --repeats rounds, reported as
ratios against baselines measured in this run. Writes benchmarks/results/tokens_throughput.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shards_throughput import MemorySampler

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_000_000, help="tokens in the stream")
    parser.add_argument("--block-size", type=int, default=512, help="context length")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median taken)")
    parser.add_argument("--workdir", default="/tmp/tokens-bench", help="where data is written")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--only-write", action="store_true", help="only hf_write and write_rss")
    parser.add_argument("--no-write", action="store_true", help="only the windows section")
    parser.add_argument("--hf-rows", type=int, default=50_000, help="rows of the datasets.Dataset")
    parser.add_argument("--rss-mb", type=int, default=300, help="size of the write_rss input files")
    parser.add_argument(
        "--before-root", default=None, help="another checkout to measure write_rss with"
    )
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: child
    return parser.parse_args(argv)


# -- windows: configurations (each in a child process) ------------------------------------------------
def shard_paths(url: str) -> list[str]:
    manifest = json.loads(Path(url, "manifest.json").read_text())
    return [os.path.join(url, shard["path"]) for shard in manifest["shards"]]


def flat_tokens(path: str):
    """A shard's token column as one flat numpy array (memory-mapped, pyarrow only)."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    return [chunk.flatten().to_numpy() for chunk in table.column("doc").chunks]


def run_pyarrow_sequential(url, block, batch, **_):
    """The ceiling: shards in order, windows sliced at a stride of ``block`` across chunk edges."""
    import numpy as np
    import torch

    length, carry = block + 1, np.zeros(0, np.int32)
    out = np.empty((batch, length), np.int32)
    filled = 0
    for path in shard_paths(url):
        for tokens in flat_tokens(path):
            data = np.concatenate([carry, tokens]) if len(carry) else tokens
            start = 0
            while start + length <= len(data):
                out[filled] = data[start : start + length]
                filled, start = filled + 1, start + block
                if filled == batch:
                    yield torch.from_numpy(out.copy())
                    filled = 0
            carry = data[start:]


def run_nanogpt(url, block, batch, epoch, **_):
    """nanoGPT's get_batch: random offsets into a flat memmap, as many windows as an epoch has."""
    import numpy as np
    import torch

    data = np.memmap(f"{url}.bin", dtype=np.int32, mode="r")
    rng = np.random.default_rng(epoch)
    for _batch in range(((len(data) - 1) // block) // batch):
        starts = rng.integers(0, len(data) - block - 1, size=batch)
        yield torch.from_numpy(np.stack([data[i : i + block + 1] for i in starts]))


_CACHE: dict = {}


def run_trainkit(url, block, batch, epoch, shuffle, workers, **_):
    from shards import ShardedLoader, TokenWindowDataset

    class World:
        rank, world_size = 0, 1

    key = ("trainkit", shuffle)
    if key not in _CACHE:
        _CACHE[key] = TokenWindowDataset(
            url,
            column="doc",
            block_size=block,
            batch_size=batch,
            shuffle=shuffle,
            world=World(),
        )
    dataset = _CACHE[key]
    dataset.set_epoch(epoch)
    return (b["doc"] for b in ShardedLoader(dataset, num_workers=workers))


def run_litdata(url, block, batch, workers, **_):
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    key = ("litdata", workers)
    if key not in _CACHE:
        dataset = StreamingDataset(
            input_dir=f"{url}-litdata",
            item_loader=TokensLoader(block_size=block + 1),
            shuffle=True,
        )
        _CACHE[key] = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers)
    return iter(_CACHE[key])


CONFIGS = {
    "pyarrow_sequential": dict(run=run_pyarrow_sequential),
    "nanogpt_memmap_random": dict(run=run_nanogpt),
    "trainkit_unshuffled_w0": dict(run=run_trainkit, shuffle=False, workers=0),
    "trainkit_shuffled_w0": dict(run=run_trainkit, shuffle=True, workers=0),
    "trainkit_shuffled_w2": dict(run=run_trainkit, shuffle=True, workers=2),
    "litdata_shuffled_w0": dict(run=run_litdata, workers=0, peer=True),
    "litdata_shuffled_w2": dict(run=run_litdata, workers=2, peer=True),
}


def convert_for_litdata(url: str) -> dict:
    """The same documents in LitData's token format, written once (a marker makes it reusable)."""
    import torch
    from litdata.streaming.cache import Cache
    from litdata.streaming.item_loader import TokensLoader

    out = f"{url}-litdata"
    if os.path.exists(os.path.join(out, ".complete")):
        return {"seconds": 0.0, "cached": True}
    import shutil

    import pyarrow as pa

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cache = Cache(out, chunk_size=1 << 24, item_loader=TokensLoader())  # 16M tokens a chunk
    index = 0
    for path in shard_paths(url):
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        for chunk in table.column("doc").chunks:
            offsets = chunk.offsets.to_numpy()
            values = chunk.flatten().to_numpy()
            base = offsets[0]
            for a, b in itertools.pairwise(offsets.tolist()):
                cache[index] = torch.from_numpy(values[a - base : b - base].copy())
                index += 1
    cache.done()
    cache.merge()
    Path(out, ".complete").write_text("")
    return {"seconds": time.perf_counter() - started, "cached": False}


def run_one(spec: dict) -> dict:
    """One warm-up epoch, then two timed epochs in this process."""
    import numpy  # noqa: F401  (imports are not data loading)
    import torch

    torch.set_num_threads(1)
    config = CONFIGS[spec["name"]]
    if spec.get("convert"):
        return convert_for_litdata(spec["url"])
    windows, seconds, sampler = 0, [], MemorySampler()
    for epoch in range(3):
        started = time.perf_counter()
        windows, checksum = 0, 0
        for batch in config["run"](
            spec["url"],
            spec["block"],
            spec["batch"],
            epoch=epoch,
            shuffle=config.get("shuffle"),
            workers=config.get("workers"),
        ):
            windows += len(batch)
            checksum += int(batch[0, -1])  # the trivial loop: touch the batch
        if epoch:
            seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "windows": windows, "peak_anon_bytes": sampler.stop()}


def make_stream(args) -> str:
    """Documents of 100..2000 random tokens as list<int32> shards, and the flat .bin nanoGPT reads."""
    import numpy as np
    import pyarrow as pa

    from shards import write_shards

    url = os.path.join(args.workdir, f"stream-{args.tokens}")
    if os.path.exists(os.path.join(url, "manifest.json")) and os.path.exists(f"{url}.bin"):
        return url
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, size=args.tokens, dtype=np.int32)
    tokens.tofile(f"{url}.bin")
    lengths = rng.integers(100, 2001, size=args.tokens // 100)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets < args.tokens]
    offsets = np.append(offsets, args.tokens).astype(np.int32)

    def batches():
        step = 10_000
        for first in range(0, len(offsets) - 1, step):
            part = offsets[first : first + step + 1]
            yield pa.record_batch(
                {
                    "doc": pa.ListArray.from_arrays(
                        pa.array(part - part[0]), pa.array(tokens[part[0] : part[-1]])
                    )
                }
            )

    write_shards(
        batches(), url, format="arrow", bytes_per_shard=32 << 20, progress=False, overwrite=True
    )
    return url


class PeerFailed(RuntimeError):
    """LitData failed; it is reported as skipped with this reason."""


def run_child(name: str, spec: dict, *, python: str | None = None, env=None) -> dict:
    peer = CONFIGS.get(name, {}).get("peer")
    command = [python or (str(PEERS_PYTHON) if peer else sys.executable), __file__]
    command += ["--run-one", json.dumps({**spec, "name": name})]
    if peer:
        env = {**os.environ, "LITDATA_DISABLE_VERSION_CHECK": "1"}
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired as error:
        if peer:
            raise PeerFailed(f"{name} ran past {error.timeout:.0f} s") from error
        raise
    if child.returncode != 0:
        if peer:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeerFailed(f"{name} exited {child.returncode}: {last[:300]}")
        raise RuntimeError(f"{name} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def windows_section(args) -> dict:
    url = make_stream(args)
    spec = {"url": url, "block": args.block_size, "batch": args.batch_size}
    names = list(CONFIGS)
    skipped = None
    if args.peers is False:
        skipped = "skipped: --no-peers"
    elif not PEERS_PYTHON.exists():
        skipped = f"skipped: {PEERS_PYTHON} not found (recipe in benchmarks/README.md)"
    conversion = None
    if skipped is None:
        try:
            conversion = run_child("litdata_shuffled_w0", {**spec, "convert": True})
        except PeerFailed as error:
            skipped = f"skipped: conversion failed: {error}"
    if skipped:
        names = [n for n in names if not CONFIGS[n].get("peer")]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        for name in list(names):
            try:
                runs[name].append(run_child(name, spec))
            except PeerFailed as error:
                skipped = f"skipped: {error}"
                names.remove(name)
        print(f"  windows round {round_index + 1}/{args.repeats} done", file=sys.stderr)
    results = {}
    for name in names:
        seconds = statistics.median(s for run in runs[name] for s in run["seconds"])
        windows = runs[name][0]["windows"]
        results[name] = {
            "seconds": seconds,
            "windows": windows,
            "windows_per_s": windows / seconds,
            "tokens_per_s": windows * (args.block_size + 1) / seconds,
            "peak_anon_mib": max(r["peak_anon_bytes"] for r in runs[name]) / 2**20,
        }
    ceiling = results["pyarrow_sequential"]["tokens_per_s"]
    nanogpt = results["nanogpt_memmap_random"]["tokens_per_s"]
    for result in results.values():
        result["vs_pyarrow_sequential"] = result["tokens_per_s"] / ceiling
        result["vs_nanogpt"] = result["tokens_per_s"] / nanogpt
    peer: dict | str = skipped or {}
    if not skipped:
        peer = {"conversion": conversion}
        for tk in ("trainkit_shuffled_w0", "trainkit_shuffled_w2"):
            for lit in ("litdata_shuffled_w0", "litdata_shuffled_w2"):
                peer[f"{tk}_over_{lit}"] = (
                    results[tk]["tokens_per_s"] / results[lit]["tokens_per_s"]
                )
    return {"stream_tokens": args.tokens, "results": results, "litdata": peer}


# -- hf_write and write_rss ------------------------------------------------------------------------------
def hf_dataset(rows: int):
    import datasets
    import numpy as np
    import pyarrow as pa

    width = 128
    ids = np.random.default_rng(0).integers(0, 50_000, size=rows * width, dtype=np.int32)
    features = datasets.Features(
        {
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "input_ids": datasets.Sequence(datasets.Value("int32"), length=width),
            "attention_mask": datasets.Sequence(datasets.Value("int8")),
        }
    )
    table = pa.table(
        {
            "label": pa.array(np.arange(rows) % 2),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), width),
            "attention_mask": pa.ListArray.from_arrays(
                pa.array(np.arange(rows + 1, dtype=np.int32) * width),
                pa.array(np.ones(rows * width, np.int8)),
            ),
        }
    )
    return datasets.Dataset(
        datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features)
    )


def time_hf_writes(spec: dict) -> dict:
    from shards import write_shards

    dataset = hf_dataset(spec["rows"])
    sources = {
        "arrow_table": lambda: dataset.data.table,
        "datasets_dataset": lambda: dataset,
        "rows_as_dicts": lambda: iter(dataset),  # what write_shards did with a Dataset before
    }
    out, types = {}, {}
    for name, source in sources.items():
        seconds = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            manifest = write_shards(
                source(), f"{spec['dir']}/{name}", format="arrow", overwrite=True, progress=False
            )
            seconds.append(time.perf_counter() - started)
        out[name] = statistics.median(seconds)
        types[name] = {f.name: str(f.type) for f in manifest.schema}
        types[name]["schema_metadata"] = sorted(k.decode() for k in manifest.schema.metadata or {})
    return {"seconds": out, "types": types}


def make_rss_inputs(args) -> dict[str, str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = 512
    rows = args.rss_mb * (1 << 20) // (width * 4)
    paths = {
        "parquet": os.path.join(args.workdir, f"rss-{args.rss_mb}.parquet"),
        "arrow_stream": os.path.join(args.workdir, f"rss-{args.rss_mb}.arrow"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    tokens = np.random.default_rng(0).integers(0, 50_000, size=rows * width, dtype=np.int32)
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens), width)})
    pq.write_table(
        table, paths["parquet"], row_group_size=10_000
    )  # pyarrow's own row groups: ~20 MB
    with pa.ipc.new_stream(paths["arrow_stream"], table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)  # datasets' writer_batch_size
    return paths


def rss_kib() -> tuple[int, int]:
    """Current and peak resident set of this process (KiB)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()[0] if value.split() else "0"
    return int(fields["VmRSS"]), int(fields["VmHWM"])


def measure_write_rss(spec: dict) -> dict:
    """Peak RSS growth writing one file: write_shards, or a raw pyarrow record-batch copy."""
    import fsspec.core  # noqa: F401  (imported by write_shards when it opens files: not the data's bytes)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if spec["how"] == "write_shards":
        from shards import write_shards
    before, _ = rss_kib()
    started = time.perf_counter()
    if spec["how"] == "write_shards":
        write_shards(spec["path"], spec["out"], format="arrow", overwrite=True, progress=False)
    else:
        source = spec["path"]
        if source.endswith(".parquet"):
            parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
            schema, batches = parquet.schema_arrow, parquet.iter_batches(batch_size=4096)
        else:
            reader = pa.ipc.open_stream(pa.OSFile(source))
            schema, batches = reader.schema, reader
        os.makedirs(spec["out"], exist_ok=True)
        with pa.ipc.new_file(os.path.join(spec["out"], "copy.arrow"), schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
    _, peak = rss_kib()
    return {"peak_growth_mib": (peak - before) / 1024, "seconds": time.perf_counter() - started}


def write_section(args) -> dict:
    report: dict = {}
    try:
        import datasets  # noqa: F401
    except ImportError:
        report["hf_write"] = "skipped: datasets not installed (pip install -e .[hf])"
    else:
        spec = {"rows": args.hf_rows, "repeats": args.repeats, "dir": f"{args.workdir}/hf"}
        hf = run_child("hf_write", spec)
        base = hf["seconds"]["arrow_table"]
        hf["vs_arrow_table"] = {name: s / base for name, s in hf["seconds"].items()}
        report["hf_write"] = hf
    paths = make_rss_inputs(args)
    roots = {"this_checkout": str(REPO)}
    if args.before_root:
        roots["before_root"] = str(Path(args.before_root).resolve())
    rss: dict = {}
    for kind, path in paths.items():
        size_mib = os.path.getsize(path) / 2**20
        rss[kind] = {"file_mib": size_mib}
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for label, root in [("pyarrow_copy", str(REPO)), *roots.items()]:
                how = "pyarrow_copy" if label == "pyarrow_copy" else "write_shards"
                env = {**os.environ, "PYTHONPATH": root}
                spec = {"how": how, "path": path, "out": f"{args.workdir}/rss-out-{label}"}
                runs.setdefault(label, []).append(run_child("write_rss", spec, env=env))
        for label, measured in runs.items():
            growth = statistics.median(r["peak_growth_mib"] for r in measured)
            rss[kind][label] = {
                "peak_rss_growth_mib": growth,
                "seconds": statistics.median(r["seconds"] for r in measured),
                "of_file_size": growth / size_mib,
            }
        copy = rss[kind]["pyarrow_copy"]["peak_rss_growth_mib"]
        for label in roots:
            rss[kind][label]["vs_pyarrow_copy"] = rss[kind][label]["peak_rss_growth_mib"] / copy
    report["write_rss"] = rss
    return report


def print_report(report: dict) -> None:
    windows = report.get("windows")
    if windows:
        print(
            f"{'configuration':<26}{'Mtokens/s':>10}{'vs seq':>8}{'vs nanoGPT':>11}{'peak MiB':>10}"
        )
        for name, r in windows["results"].items():
            print(
                f"{name:<26}{r['tokens_per_s'] / 1e6:>10.1f}{r['vs_pyarrow_sequential']:>7.2f}x"
                f"{r['vs_nanogpt']:>10.2f}x{r['peak_anon_mib']:>10.1f}"
            )
        litdata = windows["litdata"]
        if isinstance(litdata, str):
            print(f"litdata: {litdata}")
        else:
            for key, value in litdata.items():
                if key.endswith(("w0", "w2")):
                    print(f"{key}: {value:.2f}x")
    hf = report.get("hf_write")
    if isinstance(hf, dict):
        print("write_shards on a datasets.Dataset (time relative to its Arrow table):")
        for name, ratio in hf["vs_arrow_table"].items():
            print(f"  {name:<20}{ratio:>6.2f}x  input_ids: {hf['types'][name]['input_ids']}")
    elif hf:
        print(f"hf_write: {hf}")
    for kind, r in report.get("write_rss", {}).items():
        print(f"peak RSS growth writing a {r['file_mib']:.0f} MiB {kind} file:")
        for label, value in r.items():
            if isinstance(value, dict):
                extra = (
                    f", {value['vs_pyarrow_copy']:.2f}x pyarrow copy"
                    if "vs_pyarrow_copy" in value
                    else ""
                )
                print(
                    f"  {label:<16}{value['peak_rss_growth_mib']:>8.0f} MiB "
                    f"({value['of_file_size']:.2f}x the file{extra})"
                )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_one:
        spec = json.loads(args.run_one)
        if spec["name"] == "hf_write":
            result = time_hf_writes(spec)
        elif spec["name"] == "write_rss":
            result = measure_write_rss(spec)
        else:
            result = run_one(spec)
        print(json.dumps(result))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    report: dict = {
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
    }
    if not args.only_write:
        report["windows"] = windows_section(args)
    if not args.no_write:
        report.update(write_section(args))
    report["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "tokens_throughput.json"
    if (args.only_write or args.no_write) and path.exists():
        report = {**json.loads(path.read_text()), **report}  # keep the section not run
    path.write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
