"""Time to form the world: the ``k8s`` rendezvous (DNS discovery) versus torch's c10d with a fixed endpoint.

    sudo .venv/bin/python benchmarks/rendezvous.py                          # 1..8 pods
    sudo .venv/bin/python benchmarks/rendezvous.py --sizes 1,2 --repeats 2  # quick look
    sudo .venv/bin/python benchmarks/rendezvous.py --end-to-end             # also full torchrun launches

Both backends run on the same namespace pods (tests/integration/podnet.py: real dnsmasq), in the
same run, alternating. Primary figure (``rdzv_s``): one elastic agent per pod imports torch, waits
for a common start signal, then creates the rendezvous handler through torch's registry (for k8s:
DNS lookups, store discovery) and completes ``next_rendezvous()``; the time is start signal to the
last pod done, so interpreter start-up, which dominates on a loaded machine, is not measured.
``--end-to-end`` adds full ``torchrun --nproc-per-node 2`` launches (launch to every worker past
init_process_group + one all_reduce). Writes benchmarks/results/rendezvous.{json,png}; figures are
ratios k8s / c10d. Needs root, iproute2, dnsmasq (see podnet.py) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.podnet import PodNet, netns_unavailable_reason  # noqa: E402

JOB_TOKEN = secrets.token_hex(32)

AGENT = """import json, os, socket, sys, time
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
local_addr, num_nodes, control = sys.argv[1], int(sys.argv[2]), sys.argv[3]
me = socket.gethostname()
round_index = 0
while True:
    go = os.path.join(control, f"go-{round_index}.json")
    while not os.path.exists(go):
        if os.path.exists(os.path.join(control, "stop")):
            sys.exit(0)
        time.sleep(0.001)
    started = time.time()
    plan = json.load(open(go))
    params = RendezvousParameters(plan["backend"], plan["endpoint"], plan["run_id"], num_nodes, num_nodes,
                                  local_addr=local_addr)
    handler = get_rendezvous_handler(params)
    info = handler.next_rendezvous()
    done = time.time()
    out = os.path.join(control, f"out-{round_index}-{me}.json")
    with open(out + ".tmp", "w") as handle:
        json.dump({"started": started, "done": done, "rank": info.rank}, handle)
    os.replace(out + ".tmp", out)  # the benchmark never reads a half-written file
    # Hold the store until every pod has finished, as a real agent would.
    while not os.path.exists(os.path.join(control, f"end-{round_index}")):
        time.sleep(0.005)
    handler.shutdown()
    del handler, info
    round_index += 1
"""

WORKER = """import time
started = time.time()
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(1))
formed = time.time()
out = os.path.join(os.environ["OUT_DIR"], f"{os.environ['GROUP_RANK']}-{os.environ['LOCAL_RANK']}.json")
with open(out, "w") as handle:
    json.dump({"started": started, "formed": formed}, handle)
dist.destroy_process_group()
"""


def rendezvous_rounds(pods: list, agent: Path, repeats: int) -> dict[str, list[float]]:
    """Per backend, seconds from a round's start signal until the last pod's agent completed it.

    One agent process per pod runs every round (torch imported once), alternating the backends; each
    round has its own run id and port, so no state carries over.
    """
    control = Path(tempfile.mkdtemp(prefix="rdzv-agent-"))
    control.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    # The k8s backend signs its state with the job token (c10d ignores it); one per benchmark run.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRAINKIT_JOB_TOKEN=JOB_TOKEN)
    processes = [
        pod.spawn(
            [sys.executable, str(agent), pod.ip, str(len(pods)), str(control)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pod in pods
    ]
    times: dict[str, list[float]] = {"k8s": [], "c10d": []}
    try:
        time.sleep(3.0 + 0.5 * len(pods))  # every agent has imported torch and is polling
        for index in range(2 * repeats + 1):
            backend = ("k8s", "c10d")[(index + index // 2) % 2]  # k8s c10d c10d k8s k8s c10d ...
            port = 29400 + index
            endpoint = f"train:{port}" if backend == "k8s" else f"{pods[0].ip}:{port}"
            plan = {"backend": backend, "endpoint": endpoint, "run_id": f"bench{index}"}
            staging = control / "plan.tmp"
            staging.write_text(json.dumps(plan))
            signalled = time.time()
            os.replace(staging, control / f"go-{index}.json")
            outs = [control / f"out-{index}-{pod.hostname}.json" for pod in pods]
            deadline = time.monotonic() + 120
            while not all(out.exists() for out in outs):
                failed = [p for p in processes if p.poll() is not None]
                if failed or time.monotonic() > deadline:
                    stderr = failed[0].stderr.read()[-3000:] if failed else "timeout"  # type: ignore[union-attr]
                    raise RuntimeError(
                        f"{backend} round {index} with {len(pods)} pods failed: {stderr}"
                    )
                time.sleep(0.002)
            records = [json.loads(out.read_text()) for out in outs]
            assert sorted(r["rank"] for r in records) == list(range(len(pods)))
            if index > 0:  # round 0 warms up page cache and lazy imports of both paths
                times[backend].append(max(r["done"] for r in records) - signalled)
            (control / f"end-{index}").write_text("end")
            time.sleep(0.2)
    finally:
        (control / "stop").write_text("stop")
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(control, ignore_errors=True)
    return times


def launch_world(
    net: PodNet, pods: list, backend: str, worker: Path, run_id: str, nproc: int
) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="rdzv-bench-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env.update(
        OUT_DIR=str(out), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRAINKIT_JOB_TOKEN=JOB_TOKEN
    )
    endpoint = "train:29400" if backend == "k8s" else f"{pods[0].ip}:29400"
    common = [
        "--nnodes",
        str(len(pods)),
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        backend,
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        run_id,
        "--max-restarts",
        "0",
    ]
    started = time.time()
    processes = [
        pod.spawn(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *common,
                "--local-addr",
                pod.ip,
                str(worker),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pod in pods
    ]
    failures = []
    for pod, process in zip(pods, processes, strict=True):
        _, stderr = process.communicate(timeout=240)
        if process.returncode != 0:
            failures.append(f"{pod.hostname}: exit {process.returncode}\n{stderr[-2000:]}")
    if failures:
        raise RuntimeError(f"{backend} with {len(pods)} pods failed:\n" + "\n".join(failures))
    records = [json.loads(path.read_text()) for path in out.glob("*.json")]
    assert len(records) == len(pods) * nproc, (
        f"expected {len(pods) * nproc} workers, got {len(records)}"
    )
    for path in out.glob("*.json"):
        path.unlink()
    out.rmdir()
    return {
        "rendezvous_s": max(r["started"] for r in records) - started,
        "world_s": max(r["formed"] for r in records) - started,
    }


def plot(results: list[dict], end_to_end: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    pods_axis = [row["pods"] for row in results]
    for backend, style in (("k8s", "o-"), ("c10d", "s--")):
        left.plot(
            pods_axis,
            [row[f"{backend}_rdzv_s"] for row in results],
            style,
            label=f"{backend}: rendezvous",
        )
    left.set_xlabel("pods")
    left.set_ylabel("seconds, start signal to last pod done (median)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(pods_axis, [row["ratio_rdzv"] for row in results], "o-", label="rendezvous (agents)")
    if end_to_end:
        right.plot(
            pods_axis,
            [row["ratio_world"] for row in results],
            "s--",
            label="full launch, 2 procs/pod",
        )
    right.axhline(1.2, color="red", linestyle=":", label="goal 1.20")
    right.axhline(1.0, color="gray", linewidth=0.5)
    right.set_xlabel("pods")
    right.set_ylabel("k8s / c10d (fixed endpoint)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    figure.suptitle(
        "Forming the world: k8s DNS discovery vs c10d with a fixed endpoint (namespace pods, dnsmasq)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,3,4,5,6,7,8", help="pod counts (default 1..8)")
    parser.add_argument(
        "--repeats", type=int, default=8, help="rendezvous per size and backend (default 8)"
    )
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time full torchrun launches"
    )
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes per pod in --end-to-end (default 2)"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="results folder"
    )
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"rendezvous benchmark: {reason}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        agent, worker = Path(scratch) / "agent.py", Path(scratch) / "worker.py"
        agent.write_text(AGENT)
        worker.write_text(WORKER)
        for size in sizes:
            with PodNet() as net:
                pods = [net.add_pod(f"w-{i}") for i in range(size)]
                row: dict = {"pods": size}
                times = rendezvous_rounds(pods, agent, args.repeats)
                for backend, values in times.items():
                    row[f"{backend}_rdzv_s"] = statistics.median(values)
                    row[f"{backend}_rdzv_all"] = [round(v, 4) for v in values]
                row["ratio_rdzv"] = row["k8s_rdzv_s"] / row["c10d_rdzv_s"]
                if args.end_to_end:
                    world: dict[str, list[dict[str, float]]] = {"k8s": [], "c10d": []}
                    for repeat in range(max(1, args.repeats // 2)):
                        for backend in ("k8s", "c10d") if repeat % 2 == 0 else ("c10d", "k8s"):
                            world[backend].append(
                                launch_world(
                                    net, pods, backend, worker, f"w{size}x{repeat}", args.nproc
                                )
                            )
                    for backend, runs in world.items():
                        row[f"{backend}_world_s"] = statistics.median(r["world_s"] for r in runs)
                    row["ratio_world"] = row["k8s_world_s"] / row["c10d_world_s"]
                results.append(row)
                print(
                    f"{size} pods: k8s {row['k8s_rdzv_s'] * 1000:.0f} ms, c10d {row['c10d_rdzv_s'] * 1000:.0f} ms, "
                    f"ratio {row['ratio_rdzv']:.3f}",
                    flush=True,
                )

    print()
    header = f"{'pods':>4} | {'k8s ms':>8} {'c10d ms':>8} {'k8s/c10d':>8}"
    print(
        header + (f" | {'e2e k8s s':>9} {'e2e c10d s':>10} {'ratio':>6}" if args.end_to_end else "")
    )
    for row in results:
        line = f"{row['pods']:>4} | {row['k8s_rdzv_s'] * 1000:>8.0f} {row['c10d_rdzv_s'] * 1000:>8.0f} {row['ratio_rdzv']:>8.3f}"
        if args.end_to_end:
            line += f" | {row['k8s_world_s']:>9.2f} {row['c10d_world_s']:>10.2f} {row['ratio_world']:>6.3f}"
        print(line)
    worst = max(row["ratio_rdzv"] for row in results)
    # One pod never waits for a peer; from two pods on, torch's 1 s state poll sets the floor.
    first_multi = next((row for row in results if row["pods"] > 1), results[0])
    flat = results[-1]["k8s_rdzv_s"] / first_multi["k8s_rdzv_s"]
    print(
        f"worst k8s/c10d ratio {worst:.3f} (goal < 1.20); k8s time at {sizes[-1]} pods / at {first_multi['pods']}: {flat:.2f}"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "benchmark": "rendezvous",
        "baseline": "torch c10d rendezvous with a fixed endpoint (pod 0's IP), same namespace pods, same run",
        "measure": "start signal (torch already imported) to the last agent's next_rendezvous() return",
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": results,
        "worst_ratio": worst,
        "k8s_growth_largest_over_smallest_multi_pod": flat,
        "goal_ratio": 1.2,
    }
    (out / "rendezvous.json").write_text(json.dumps(summary, indent=2))
    try:
        plot(results, args.end_to_end, out / "rendezvous.png")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
