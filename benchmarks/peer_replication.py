"""Peer replicas between two namespace pods: push and fetch throughput against a raw TCP stream.

    sudo .venv/bin/python benchmarks/peer_replication.py                      # 256 MiB, veth as is + 1 Gbit/s
    sudo .venv/bin/python benchmarks/peer_replication.py --mib 64 --repeats 2 # quick look
    sudo .venv/bin/python benchmarks/peer_replication.py --link-mbit 0,1000,4000

Two pods (tests/integration/podnet.py): ``w-0`` runs a ``ReplicaServer`` on its pod IP and a raw
TCP endpoint; ``w-1`` pushes a snapshot of ``--mib`` MiB (4 files in tmpfs, as the memory tier
writes them) and fetches it back into a new directory, alternating with the baseline: the same
number of bytes sent (and received) over a plain TCP socket from memory to memory, like iperf. Every
figure is a ratio against that baseline in the same run, per repeat, median over repeats. Each
``--link-mbit`` setting is a fresh pair of pods; 0 leaves the veth unshaped (memory-copy speed, so
the channel's per-byte CPU work shows: HMAC-SHA256 of every byte on both ends), any other value
shapes both directions with tc tbf, as a NIC slower than the CPU would. ``hmac_ratio`` is one
core's HMAC-SHA256 of the same bytes, measured in the pod, against the baseline. The throttle rows
push with ``rate_bytes_per_s`` and report achieved / requested. Writes
benchmarks/results/peer_replication.{json,png}. Needs root, iproute2, tc, dnsmasq (see podnet.py).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.podnet import PodNet, netns_unavailable_reason  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
JOB_TOKEN = secrets.token_hex(32)
RAW_PORT = 29411

HOLDER = """import os, socket, sys, threading, time
from trainkit.checkpoint.peer import ReplicaServer, token_from_env
root, raw_port = sys.argv[1], int(sys.argv[2])
server = ReplicaServer(root, host=os.environ["POD_IP"], port=29410, token=token_from_env(), keep=2)
server.start()
buffer = memoryview(bytearray(4 << 20))

def raw(connection):
    with connection:
        header = b""
        while len(header) < 32:  # a fixed-size header: nothing of the payload is read ahead
            header += connection.recv(32 - len(header))
        command, size = header.split()
        size = int(size)
        if command == b"sink":
            got = 0
            while got < size:
                count = connection.recv_into(buffer)
                if not count:
                    return
                got += count
            connection.sendall(b"k")
        else:
            sent = 0
            while sent < size:
                connection.sendall(buffer[: min(len(buffer), size - sent)])
                sent += min(len(buffer), size - sent)

listener = socket.create_server((os.environ["POD_IP"], raw_port))
print("ready", flush=True)
while True:
    connection, _ = listener.accept()
    raw(connection)
"""

CLIENT = """import hashlib, hmac, json, os, shutil, socket, sys, time
from trainkit.checkpoint.peer import fetch_snapshot, push_snapshot, token_from_env
host, raw_port, snapshot, scratch, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
rates = json.loads(sys.argv[6])
token, address = token_from_env(), (host, 29410)
size = sum(os.path.getsize(os.path.join(snapshot, name)) for name in os.listdir(snapshot))
buffer = memoryview(bytearray(4 << 20))

def raw_send():
    with socket.create_connection((host, raw_port)) as connection:
        started = time.perf_counter()
        connection.sendall(f"sink {size}".ljust(32).encode())
        sent = 0
        while sent < size:
            connection.sendall(buffer[: min(len(buffer), size - sent)])
            sent += min(len(buffer), size - sent)
        connection.recv(1)
        return time.perf_counter() - started

def raw_receive():
    with socket.create_connection((host, raw_port)) as connection:
        started = time.perf_counter()
        connection.sendall(f"source {size}".ljust(32).encode())
        got = 0
        while got < size:
            count = connection.recv_into(buffer)
            if not count:
                raise SystemExit("raw source closed early")
            got += count
        return time.perf_counter() - started

def timed(function, *args, **kwargs):
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started

def hmac_one_core():
    base = hmac.new(token, digestmod=hashlib.sha256)
    started = time.perf_counter()
    for _ in range(size // len(buffer)):
        mac = base.copy()
        mac.update(buffer)
        mac.digest()
    return time.perf_counter() - started

runs = []
for repeat in range(repeats):
    dest = os.path.join(scratch, f"fetched-{repeat}")
    runs.append({
        "raw_send_s": raw_send(),
        "push_s": timed(push_snapshot, address, token, owner="node-1", step=repeat, directory=snapshot),
        "raw_receive_s": raw_receive(),
        "fetch_s": timed(fetch_snapshot, address, token, owner="node-1", step=repeat, dest=dest),
        "hmac_s": hmac_one_core(),
    })
    shutil.rmtree(dest)
throttled = []
for rate in rates:
    directory = os.path.join(scratch, f"throttled-{int(rate)}")
    os.makedirs(directory)
    with open(os.path.join(directory, "data"), "wb") as handle:
        handle.write(os.urandom(int(rate * 2)))  # two seconds' worth
    seconds = timed(push_snapshot, address, token, owner="throttled", step=int(rate),
                    directory=directory, rate_bytes_per_s=rate)
    throttled.append({"requested_bytes_per_s": rate, "achieved_bytes_per_s": int(rate * 2) / seconds})
    shutil.rmtree(directory)
print(json.dumps({"bytes": size, "runs": runs, "throttled": throttled}))
"""


def shape(net: PodNet, pod, mbit: int) -> None:
    """tc tbf on both ends of the pod's veth, so traffic into and out of the pod is limited."""
    index = pod.name.rsplit("-", 1)[1]
    burst = f"{max(32, mbit // 8)}kb"  # about 1 ms of traffic: tbf needs a burst that keeps up
    tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", burst, "latency", "50ms"]
    subprocess.run(["tc", "qdisc", "add", "dev", f"tkv{net.uid}{index}", *tbf], check=True)
    subprocess.run(
        ["ip", "netns", "exec", pod.name, "tc", "qdisc", "add", "dev", "eth0", *tbf], check=True
    )


def make_snapshot(directory: Path, total_bytes: int) -> None:
    directory.mkdir(parents=True)
    block = secrets.token_bytes(1 << 20)
    for index in range(4):  # like a memory snapshot: model, optimizer, rank state, loader
        with open(directory / f"part-{index}.bin", "wb") as handle:
            for _ in range(total_bytes // 4 // len(block)):
                handle.write(block)


def measure(link_mbit: int, mib: int, repeats: int, rates: list[float]) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="tk-peer-bench-", dir="/dev/shm"))
    env = {"PYTHONPATH": str(REPO), "TRAINKIT_JOB_TOKEN": JOB_TOKEN}
    try:
        make_snapshot(scratch / "snapshot", mib << 20)
        with PodNet(service="bench") as net:
            holder, owner = net.add_pod("w-0"), net.add_pod("w-1")
            if link_mbit:
                shape(net, holder, link_mbit)
                shape(net, owner, link_mbit)
            server = holder.spawn(
                [sys.executable, "-c", HOLDER, str(scratch / "holder"), str(RAW_PORT)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            (scratch / "client").mkdir()
            argv = [
                sys.executable,
                "-c",
                CLIENT,
                holder.ip,
                str(RAW_PORT),
                str(scratch / "snapshot"),
                str(scratch / "client"),
                str(repeats),
                json.dumps(rates),
            ]
            result = owner.run(argv, env=env, timeout=1800)
            if result.returncode != 0:
                raise RuntimeError(f"benchmark client failed:\n{result.stderr[-3000:]}")
            return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def summarize(link_mbit: int, measured: dict) -> dict:
    size = measured["bytes"]
    runs = measured["runs"]

    def median_ratio(numerator: str, denominator: str) -> float:
        # Baseline time / channel time = channel throughput / baseline throughput, per repeat.
        return statistics.median(run[denominator] / run[numerator] for run in runs)

    def median_gbps(key: str) -> float:
        return statistics.median(size / run[key] / 1e9 for run in runs)

    return {
        "link": "veth, unshaped" if not link_mbit else f"veth, tc tbf {link_mbit} Mbit/s",
        "link_mbit": link_mbit,
        "bytes": size,
        "raw_send_gbps": median_gbps("raw_send_s"),
        "push_gbps": median_gbps("push_s"),
        "push_ratio": median_ratio("push_s", "raw_send_s"),
        "raw_receive_gbps": median_gbps("raw_receive_s"),
        "fetch_gbps": median_gbps("fetch_s"),
        "fetch_ratio": median_ratio("fetch_s", "raw_receive_s"),
        "hmac_one_core_gbps": median_gbps("hmac_s"),
        "hmac_ratio": median_ratio("hmac_s", "raw_receive_s"),
        "throttle": [
            {**row, "ratio": row["achieved_bytes_per_s"] / row["requested_bytes_per_s"]}
            for row in measured["throttled"]
        ],
        "runs": runs,
    }


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: wrote JSON only")
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    labels = [row["link"] for row in rows]
    width = 0.25
    for offset, key, name in (
        (-width, "push_ratio", "push / raw TCP send"),
        (0.0, "fetch_ratio", "fetch / raw TCP receive"),
        (width, "hmac_ratio", "1-core HMAC-SHA256 / raw TCP"),
    ):
        values = [row[key] for row in rows]
        positions = [i + offset for i in range(len(rows))]
        axis.bar(positions, [min(value, 1.45) for value in values], width, label=name)
        for position, value in zip(positions, values, strict=True):  # clipped bars keep their value
            axis.text(position, min(value, 1.45) + 0.02, f"{value:.2f}", ha="center", fontsize=8)
    axis.axhline(0.8, color="grey", linestyle="--", linewidth=1, label="target 0.8")
    axis.set_ylim(0, 1.6)
    axis.set_xticks(range(len(rows)), labels)
    axis.set_ylabel("throughput / baseline (same run)")
    axis.set_title(f"peer replicas between two namespace pods, {rows[0]['bytes'] >> 20} MiB")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "peer_replication.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="snapshot size in MiB (default 256)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating repeats; medians (default 3)"
    )
    parser.add_argument(
        "--link-mbit", default="0,1000", help="link settings, 0 = unshaped veth (default 0,1000)"
    )
    parser.add_argument(
        "--throttle-mbytes", default="20,60", help="push rates to check the throttle at, MB/s"
    )
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        sys.exit(f"peer_replication benchmark: {reason}")
    rates = [float(value) * 1e6 for value in args.throttle_mbytes.split(",") if value]
    rows = []
    for link in (int(value) for value in args.link_mbit.split(",")):
        rows.append(summarize(link, measure(link, args.mib, args.repeats, rates)))

    print(
        f"peer replicas, {args.mib} MiB snapshot (4 files in tmpfs) between two namespace pods; "
        f"ratios against raw TCP of the same bytes in the same run, median of {args.repeats}"
    )
    print(f"{'link':>24} {'raw GB/s':>9} {'push':>6} {'fetch':>6} {'hmac 1 core':>12}")
    for row in rows:
        print(
            f"{row['link']:>24} {row['raw_send_gbps']:>9.3f} {row['push_ratio']:>6.2f} "
            f"{row['fetch_ratio']:>6.2f} {row['hmac_ratio']:>12.2f}"
        )
    print("\nthrottle (achieved / requested rate)")
    for row in rows:
        for entry in row["throttle"]:
            print(
                f"{row['link']:>24} {entry['requested_bytes_per_s'] / 1e6:>6.0f} MB/s "
                f"{entry['ratio']:>6.3f}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "snapshot_mib": args.mib,
        "repeats": args.repeats,
        "baseline": "raw TCP between the same two pods, memory to memory, the same number of "
        "bytes (push vs send, fetch vs receive)",
        "rows": rows,
    }
    (RESULTS / "peer_replication.json").write_text(json.dumps(document, indent=2))
    plot(rows)
    print(f"wrote {RESULTS / 'peer_replication.json'} and {RESULTS / 'peer_replication.png'}")


if __name__ == "__main__":
    main()
