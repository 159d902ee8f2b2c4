"""Memory-first checkpoints: snapshot blocking, training slowdown, restore from memory, from a
peer and from storage, and work lost per failure, in one run.

    python benchmarks/memory_checkpoint.py                    # 256 MiB state, 200 training steps
    python benchmarks/memory_checkpoint.py --state-mib 64 --steps 100 --dir /tmp/bench   # quick look

Every figure is a ratio against a baseline measured in the same run: snapshot blocking vs a warm
memcpy of the same bytes (limit 1.2x); training with a snapshot every 10 steps plus replication
to a peer vs the same loop without checkpoints (limit 3% slower); restore from pod memory vs memcpy
speed (at least 0.5x) and vs the storage restore of the same state (at least 5x faster than
object storage, here moto's S3 server on loopback; a local disk is reported too); restore
from the peer vs raw TCP bandwidth over the same link (at least 0.8x); work lost per failure in
steps and seconds against the storage interval. The peer is a replica server on loopback, so its
"link" is loopback; storage is --dir (read cold: dropped from the page cache first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from trainkit.checkpoint import CheckpointManager
from trainkit.checkpoint.layout import serialize_rank_state, split_state
from trainkit.checkpoint.memory_tier import MemoryTier, state_bytes
from trainkit.checkpoint.peer import ReplicaServer, fetch_snapshot, push_snapshot
from trainkit.checkpoint.replication import Replicator

RESULTS = Path(__file__).parent / "results"
TOKEN = b"benchmark-token-0123456789abcdef"
#: The per-rank file of a rank with no per-rank state (what the manager writes beside the tensors).
RANK_BYTES = serialize_rank_state(
    {"format": 1, "rank": 0, "world_size": 1, "entries": {}, "rng": None}, 0
)
LIMITS = {
    "snapshot_blocking_vs_memcpy": ("<=", 1.2),
    "training_slowdown": ("<=", 1.03),
    "memory_restore_vs_memcpy_speed": (">=", 0.5),
    "memory_restore_speedup_vs_storage": (">=", 5.0),
    "memory_restore_speedup_vs_disk": ("info", 0.0),
    "peer_restore_vs_link_bandwidth": (">=", 0.8),
}


def build_state(state_mib: float) -> dict[str, object]:
    """An MLP (like the example's) whose weights plus SGD momentum take ``state_mib`` MiB."""
    width = int((state_mib * 2**20 / 4 / 2 / 4) ** 0.5)  # 4 square layers, weights + momentum
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    train_step(model, optimizer, width)
    return {"model": model, "optim": optimizer}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    loss = model(torch.randn(32, width)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def best(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def drop_cache(path: Path) -> None:
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def link_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes/s of a raw TCP transfer of ``num_bytes`` over loopback (the peer's link here)."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * 4)
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()

    def sink() -> None:
        for _ in range(repeats):
            connection, _ = listener.accept()
            with connection:
                buffer = bytearray(1 << 22)
                while connection.recv_into(buffer):
                    pass

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()

    def send() -> None:
        with socket.create_connection(address) as sock:
            sent = 0
            while sent < num_bytes:
                sock.sendall(payload[: min(len(payload), num_bytes - sent)])
                sent += min(len(payload), num_bytes - sent)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)

    seconds = best(send, repeats)
    thread.join(timeout=10)
    listener.close()
    return num_bytes / seconds


def training_time(
    state: dict[str, object], steps: range, *, tier: MemoryTier | None, interval: int
) -> float:
    """Seconds per step of the loop, with a memory snapshot every ``interval`` steps when ``tier``."""
    model, optimizer = state["model"], state["optim"]
    width = model[0].in_features  # type: ignore[index]
    started = time.perf_counter()
    for step in steps:
        train_step(model, optimizer, width)  # type: ignore[arg-type]
        if tier is not None and step % interval == 0:
            global_state, _, _ = split_state(state, per_rank=False)
            tier.snapshot(step, global_state, RANK_BYTES)
    if tier is not None:
        tier.wait()
    return (time.perf_counter() - started) / len(steps)


class PeerProcess:
    """A replica server in a process of its own, as the peer pod's agent would run it."""

    def __init__(self, root: Path) -> None:
        code = (
            "import sys, time\n"
            "from trainkit.checkpoint.peer import ReplicaServer\n"
            f"server = ReplicaServer({str(root)!r}, host='127.0.0.1', port=0, token={TOKEN!r})\n"
            "server.start()\n"
            "print(server.address[1], flush=True)\n"
            "sys.stdin.read()\n"
            "server.close()\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.address = ("127.0.0.1", int(self.process.stdout.readline()))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def start_peer_process(root: Path) -> PeerProcess:
    return PeerProcess(root)


def start_moto() -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """moto's S3 server on loopback: an S3-compatible stand-in for object storage."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    options: dict[str, object] = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
    }
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")
    return process, options


def storage_restore_time(
    root: str, options: dict[str, object] | None, state: dict, fresh: dict, repeats: int
) -> float:
    """Best time of a ``CheckpointManager`` restore of ``state`` saved under ``root`` (cold on disk)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with CheckpointManager(
            root, storage_options=options, signals=None, capture_rng=False
        ) as manager:
            manager.save(1, state, block=True)

        def restore() -> None:
            if options is None:
                drop_cache(Path(root))
            with CheckpointManager(
                root, storage_options=options, signals=None, capture_rng=False
            ) as manager:
                manager.restore(fresh)

        return best(restore, repeats)


def run(args: argparse.Namespace) -> dict[str, object]:
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="trainkit-bench-"))
    shm = Path(
        tempfile.mkdtemp(
            prefix="trainkit-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
        )
    )
    figures: dict[str, float] = {}
    try:
        state = build_state(args.state_mib)
        global_state, _, _ = split_state(state, per_rank=False)
        num_bytes = state_bytes(global_state)
        flat = [t for t in _tensors(global_state)]
        copies = [torch.empty_like(t) for t in flat]

        def memcpy() -> None:
            for target, source in zip(copies, flat, strict=True):
                target.copy_(source)

        memcpy()  # warm: pages of the destination touched once, like reused snapshot buffers
        memcpy_s = best(memcpy, args.repeats)

        tier = MemoryTier(str(shm / "ranks"), owner="rank-0-of-1", keep=2, capture_rng=False)
        tier.snapshot(0, global_state, RANK_BYTES)
        tier.wait()
        blocking = []
        for step in range(1, args.repeats + 1):
            tier.snapshot(step, global_state, RANK_BYTES)
            blocking.append(tier.last_blocking_s or 0.0)
            tier.wait()
        figures["snapshot_blocking_vs_memcpy"] = min(blocking) / memcpy_s

        # Restore after a worker restart: this rank's own memory, into a fresh state.
        fresh = build_state(args.state_mib)
        newest = tier.committed_steps()[-1]
        memory_restore_s = best(lambda: tier.restore_step(newest, fresh), args.repeats)
        figures["memory_restore_vs_memcpy_speed"] = memcpy_s / memory_restore_s

        # The same state from storage: a local disk (cold) and an S3-compatible server.
        storage = workdir / "storage"
        shutil.rmtree(storage, ignore_errors=True)
        disk_s = storage_restore_time(str(storage), None, state, fresh, args.repeats)
        figures["memory_restore_speedup_vs_disk"] = disk_s / memory_restore_s
        moto, options = start_moto()
        try:
            s3_s = storage_restore_time("s3://bench/run", options, state, fresh, args.repeats)
        finally:
            moto.terminate()
            moto.wait(timeout=10)
        figures["memory_restore_speedup_vs_storage"] = s3_s / memory_restore_s

        # After a pod loss: pull the replica from the peer's server, then load it.
        server = ReplicaServer(str(shm / "replicas"), host="127.0.0.1", port=0, token=TOKEN)
        server.start()
        peer = start_peer_process(shm / "peer")
        try:
            push_snapshot(
                server.address, TOKEN, owner="rank-0-of-1", step=newest,
                directory=tier.step_directory(newest),
            )  # fmt: skip
            pulled = shm / "pulled"

            def fetch() -> int:
                shutil.rmtree(pulled, ignore_errors=True)
                return fetch_snapshot(
                    server.address, TOKEN, owner="rank-0-of-1", step=newest, dest=str(pulled)
                )

            fetch_s = best(fetch, args.repeats)
            snapshot_bytes = fetch()
            link = link_bandwidth(snapshot_bytes, args.repeats)
            figures["peer_restore_vs_link_bandwidth"] = (snapshot_bytes / fetch_s) / link

            # Training: no checkpoints vs a snapshot every 10 steps replicated to the peer.
            baseline_s, memory_s = [], []
            replicators: list[Replicator] = []
            tier_with_peer = MemoryTier(
                str(shm / "train"), owner="rank-0-of-1", keep=2, capture_rng=False,
                on_commit=lambda step, directory: replicators[0].offer(step, directory),
            )  # fmt: skip
            replicator = Replicator(
                peer.address, TOKEN, owner="rank-0-of-1", rate_bytes_per_s=args.rate_mib_s * 2**20,
                protect=tier_with_peer.protect,
            )  # fmt: skip
            replicators.append(replicator)
            for round_index in range(args.rounds):  # interleaved: load changes hit both alike
                steps = range(round_index * args.steps + 1, (round_index + 1) * args.steps + 1)
                baseline_s.append(training_time(state, steps, tier=None, interval=10))
                memory_s.append(training_time(state, steps, tier=tier_with_peer, interval=10))
            replicator.drain(60)
            replicator.close()
            step_s = statistics.median(baseline_s)
            figures["training_slowdown"] = statistics.median(memory_s) / step_s
        finally:
            server.close()
            peer.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    lost = {
        "memory_interval_steps": 10,
        "storage_interval_steps": args.storage_interval,
        "memory_lost_s": 10 * step_s,
        "storage_lost_s": args.storage_interval * step_s,
        "lost_ratio": 10 / args.storage_interval,
    }
    return {
        "state_bytes": num_bytes,
        "memcpy_gib_s": num_bytes / memcpy_s / 2**30,
        "step_s": step_s,
        "figures": figures,
        "work_lost_per_failure": lost,
        "replication": {
            "bytes": replicator.bytes_sent,
            "lag_steps": replicator.lag_steps,
            "snapshots_skipped_while_writing": tier_with_peer.num_skipped,
        },
    }


def _tensors(tree: object) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, list | tuple):
        return [t for value in tree for t in _tensors(value)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mib", type=float, default=256, help="model + momentum MiB")
    parser.add_argument("--steps", type=int, default=200, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved training rounds")
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats of each timed operation (best)"
    )
    parser.add_argument("--rate-mib-s", type=float, default=512, help="replication throttle, MiB/s")
    parser.add_argument(
        "--storage-interval",
        type=int,
        default=500,
        help="storage interval to compare work lost with",
    )
    parser.add_argument("--dir", default="", help="storage directory (on the disk to measure)")
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads of the training loop (default 1: the other cores are the host cores a "
        "GPU job leaves to the snapshot writer)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.train_threads)
    result = run(args)
    print(
        f"state {result['state_bytes'] / 2**20:.0f} MiB, memcpy {result['memcpy_gib_s']:.2f} GiB/s, step {result['step_s'] * 1e3:.1f} ms"
    )
    print(f"{'figure':38} {'ratio':>8}  limit   ok")
    for name, value in result["figures"].items():
        sense, limit = LIMITS[name]
        if sense == "info":
            print(f"{name:38} {value:8.2f}  (no limit)")
            continue
        ok = value <= limit if sense == "<=" else value >= limit
        print(f"{name:38} {value:8.2f}  {sense}{limit:<5} {'yes' if ok else 'NO'}")
    lost = result["work_lost_per_failure"]
    print(
        f"work lost per failure: <= {lost['memory_interval_steps']} steps ({lost['memory_lost_s']:.2f} s) "
        f"vs {lost['storage_interval_steps']} steps ({lost['storage_lost_s']:.2f} s) with storage only"
    )
    RESULTS.mkdir(exist_ok=True)
    # The storage directory is a path of the machine that ran it: only whether one was given.
    meta = {
        "args": {**vars(args), "dir": bool(args.dir)},
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    (RESULTS / "memory_checkpoint.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    print(f"wrote {RESULTS / 'memory_checkpoint.json'}")


if __name__ == "__main__":
    main()
