"""Checkpoint speed: trainkit vs torch.save/torch.load, plain DCP, the raw disk and a memcpy, one run.

    python benchmarks/checkpoint.py                       # ~1 GiB and ~3 GiB states (model + Adam)
    python benchmarks/checkpoint.py --sizes-gib 0.25 --repeats 1 --dir /tmp/bench   # quick look

Every figure is a ratio against a baseline measured in the same run: trainkit sync save vs a raw
direct-I/O sequential write of the same byte count, restore vs a cold sequential read, async
blocking time vs a warm memcpy of the state bytes. Reads are cold: each file is dropped from the
page cache (fsync + POSIX_FADV_DONTNEED) first. Writes to --dir, which must be on the disk to measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CHUNK_BYTES = 32 << 20
RESULTS = Path(__file__).parent / "results"


def build_state(total_gib: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model whose parameters plus Adam's two moments take ``total_gib`` GiB (fp32)."""
    num_params = int(total_gib * 2**30 / 12)
    layer_numel = 8 << 20
    sizes = [layer_numel] * (num_params // layer_numel) + (
        [num_params % layer_numel] if num_params % layer_numel else []
    )
    model = nn.ParameterList([nn.Parameter(torch.randn(size) * 0.01) for size in sizes])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for parameter in model:
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for entry in optimizer.state.values():
        total += sum(
            v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor)
        )
    return total


def drop_cache(path: Path) -> None:
    """Make the next read of ``path`` (a file or every file below a directory) come from the disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def raw_direct_write(path: Path, num_bytes: int, buffer: mmap.mmap) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        view, written = memoryview(buffer), 0
        while written < num_bytes:
            written += os.write(
                fd, view[: min(CHUNK_BYTES, num_bytes - written + (-num_bytes) % 4096)]
            )
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_cold_read(path: Path, buffer: mmap.mmap) -> None:
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while handle.readinto(view):
            pass


def bench_size(total_gib: float, workdir: Path, repeats: int) -> dict[str, object]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainkit.checkpoint import CheckpointManager

    model, optimizer = build_state(total_gib)
    num_bytes = state_bytes(model, optimizer)
    state = {"model": model, "optim": optimizer}
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    buffer = mmap.mmap(-1, CHUNK_BYTES)
    buffer.write(os.urandom(1 << 20) * (CHUNK_BYTES >> 20))
    raw = workdir / "raw.bin"
    for _ in range(repeats):
        record("raw direct write", timed(lambda: raw_direct_write(raw, num_bytes, buffer)))
        drop_cache(raw)
        record("raw cold read", timed(lambda: raw_cold_read(raw, buffer)))
    raw.unlink()

    tensors = [p.detach() for p in model.parameters()]
    tensors += [
        v
        for entry in optimizer.state.values()
        for v in entry.values()
        if isinstance(v, torch.Tensor) and v.dim()
    ]
    arena = torch.empty(num_bytes, dtype=torch.uint8)

    def memcpy() -> None:
        offset = 0
        for tensor in tensors:
            count = tensor.numel() * tensor.element_size()
            arena[offset : offset + count].copy_(tensor.reshape(-1).view(torch.uint8))
            offset += count

    memcpy()  # first touch of the arena is not what we measure
    for _ in range(repeats):
        record("memcpy (warm)", timed(memcpy))
    arena = torch.empty(0, dtype=torch.uint8)  # give the memory back before the next measurement
    gc.collect()

    root = workdir / "trainkit"
    sync = CheckpointManager(root, async_save=False, keep_last=1, signals=None)
    sync.save(0, state)  # warm-up: buffer pool, DCP planning caches
    for index in range(repeats):
        record("trainkit save (sync)", timed(lambda index=index: sync.save(index + 1, state)))
        sync.wait()  # old steps are deleted in the background; not part of the save's time
        drop_cache(root)
        record("trainkit restore (cold)", timed(lambda: sync.restore(state)))
    sync.close()
    shutil.rmtree(root)

    asynchronous = CheckpointManager(root, async_save=True, keep_last=1, signals=None)
    asynchronous.save(0, state)  # warm-up: allocates the reused host buffers
    asynchronous.wait()
    for index in range(repeats):
        started = time.perf_counter()
        asynchronous.save(index + 1, state)
        record("trainkit async blocking", time.perf_counter() - started)
        asynchronous.wait()
        record("trainkit async total", time.perf_counter() - started)
    asynchronous.close()
    shutil.rmtree(root)

    path = workdir / "torch_save.pt"

    def torch_save() -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with open(path, "wb") as handle:
            torch.save({"model": model_sd, "optim": optim_sd}, handle)
            handle.flush()
            os.fsync(handle.fileno())

    for _ in range(repeats):
        record("torch.save", timed(torch_save))
        drop_cache(path)
        record("torch.load (cold)", timed(lambda: torch.load(path, weights_only=True)))
        gc.collect()
    path.unlink()

    dcp_dir = workdir / "dcp"
    for _ in range(repeats):
        shutil.rmtree(dcp_dir, ignore_errors=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": optim_sd}
        record("DCP save", timed(lambda target=target: dcp.save(target, checkpoint_id=dcp_dir)))
        drop_cache(dcp_dir)
        record(
            "DCP load (cold)", timed(lambda target=target: dcp.load(target, checkpoint_id=dcp_dir))
        )
    shutil.rmtree(dcp_dir)

    medians = {name: statistics.median(values) for name, values in times.items()}
    gbps = {name: num_bytes / seconds / 1e9 for name, seconds in medians.items()}
    ratios = {
        "sync save / raw direct write (goal >= 0.8)": gbps["trainkit save (sync)"]
        / gbps["raw direct write"],
        "restore / raw cold read (goal >= 0.8)": gbps["trainkit restore (cold)"]
        / gbps["raw cold read"],
        "async blocking / memcpy time (goal <= 1.5)": medians["trainkit async blocking"]
        / medians["memcpy (warm)"],
        "sync save / torch.save": gbps["trainkit save (sync)"] / gbps["torch.save"],
        "restore / torch.load": gbps["trainkit restore (cold)"] / gbps["torch.load (cold)"],
        "sync save / DCP save": gbps["trainkit save (sync)"] / gbps["DCP save"],
        "restore / DCP load": gbps["trainkit restore (cold)"] / gbps["DCP load (cold)"],
    }
    return {
        "size_gib": total_gib,
        "state_bytes": num_bytes,
        "repeats": repeats,
        "seconds": times,
        "median_s": medians,
        "gb_per_s": gbps,
        "ratios": ratios,
    }


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        "raw direct write",
        "trainkit save (sync)",
        "DCP save",
        "torch.save",
        "raw cold read",
        "trainkit restore (cold)",
        "DCP load (cold)",
        "torch.load (cold)",
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(results)
    for index, result in enumerate(results):
        positions = [i + index * width for i in range(len(names))]
        left.bar(
            positions,
            [result["gb_per_s"][n] for n in names],
            width,
            label=f"{result['size_gib']:g} GiB",
        )
        ratio_names = list(result["ratios"])
        right.barh(
            [i + index * width for i in range(len(ratio_names))],
            list(result["ratios"].values()),
            width,
            label=f"{result['size_gib']:g} GiB",
        )
    left.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right"
    )
    left.set_ylabel("GB/s (median)")
    left.set_title("Throughput, same run")
    left.legend()
    right.set_yticks([i + 0.4 - width / 2 for i in range(len(ratio_names))], ratio_names)
    right.axvline(1.0, color="grey", linewidth=0.8)
    right.set_title("Ratios against same-run baselines")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes-gib", type=float, nargs="+", default=[1.0, 3.0], help="state sizes (model + Adam)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed repetitions per measurement (medians)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch directory on the disk under test"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tk-ckpt-bench-", dir=args.dir))
    results = []
    try:
        for size in args.sizes_gib:
            result = bench_size(size, workdir, args.repeats)
            results.append(result)
            print(
                f"\n== state {result['state_bytes'] / 2**30:.2f} GiB (model + Adam), medians of {args.repeats}"
            )
            print(f"{'method':<28}{'seconds':>10}{'GB/s':>10}")
            for name, seconds in result["median_s"].items():
                print(f"{name:<28}{seconds:>10.3f}{result['gb_per_s'][name]:>10.2f}")
            for name, ratio in result["ratios"].items():
                print(f"  {name:<46}{ratio:>8.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "time_unix_s": time.time()}
    (RESULTS / "checkpoint.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    plot(results, RESULTS / "checkpoint.png")
    print(f"\nwrote {RESULTS / 'checkpoint.json'} and {RESULTS / 'checkpoint.png'}")


if __name__ == "__main__":
    main()
