"""Launch overhead of trainkit-ray against trainkit-run and Ray Train's own TorchTrainer.

    .venv/bin/python benchmarks/launch_overhead.py                  # starts a local Ray head (2 CPUs)
    .venv/bin/python benchmarks/launch_overhead.py --repeats 5
    .venv/bin/python benchmarks/launch_overhead.py --address HOST:PORT   # an existing cluster

One trivial job, 2 processes on this machine: join the world (gloo), one all_reduce, exit. Three
launchers, alternating in each round: ``trainkit-run --standalone`` (baseline), ``trainkit-ray`` on a
running Ray cluster, and Ray Train's ``TorchTrainer`` with the same work in its own process group
(what a Ray user would write instead). Figures: launch to every rank past its all_reduce
(``ready_s``) and launch to launcher exit (``total_s``). Ratios trainkit-ray / trainkit-run and
trainkit-ray / TorchTrainer, primary: the median of per-round ratios (launches of one round run
back to back, so they share the machine's load); also the ratio of medians. Writes
benchmarks/results/launch_overhead.json. Needs the ray extra.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOB = """import json, os, sys, time
import torch, torch.distributed as dist
import trainkit
world = trainkit.init(backend="gloo")
value = torch.ones(1)
dist.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank-{world.rank}.json"), "w") as out:
    json.dump({"ready": time.time(), "sum": value.item()}, out)
trainkit.shutdown()
"""

TORCH_TRAINER = """import json, os, sys, time
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def work(config):
    import torch, torch.distributed as dist, ray.train
    value = torch.ones(1)
    dist.all_reduce(value)  # Ray Train created this process group in the worker actor
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank-{rank}.json"), "w") as out:
        json.dump({"ready": time.time(), "sum": value.item()}, out)

ray.init(address=sys.argv[1], log_to_driver=False)
TorchTrainer(work, train_loop_config={"out": sys.argv[2]}, scaling_config=ScalingConfig(num_workers=2),
             run_config=RunConfig(storage_path=sys.argv[3])).fit()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_", "RAY_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def time_launch(command: list[str], out: Path) -> dict[str, float]:
    out.mkdir()
    started = time.time()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=REPO
    )
    total_s = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {result.returncode}:\n{result.stderr[-3000:]}")
    records = [json.loads(path.read_text()) for path in out.glob("rank-*.json")]
    if len(records) != 2 or any(r["sum"] != 2 for r in records):
        raise RuntimeError(f"{command[:3]}: expected 2 ranks that all-reduced, got {records}")
    shutil.rmtree(out)
    return {"ready_s": max(r["ready"] for r in records) - started, "total_s": total_s}


def start_cluster(temp_dir: str) -> str:
    port = free_port()
    subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=200000000",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env=clean_env(),
    )
    return f"127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="launches per launcher (default 3)")
    parser.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: start one)"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="results folder"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tk-launch-"))
    (work / "job.py").write_text(JOB)
    (work / "torch_trainer.py").write_text(TORCH_TRAINER)
    ray_temp = tempfile.mkdtemp(prefix="tkray-", dir="/tmp")  # Ray's socket paths must stay short
    address = args.address or start_cluster(ray_temp)
    launchers = {
        "trainkit-run": [
            sys.executable, "-m", "launchers.run", "--standalone", "--nproc-per-node", "2",
            str(work / "job.py"),
        ],
        "trainkit-ray": [
            sys.executable, "-m", "launchers.ray.cli", "--address", address, "--num-workers", "2",
            "--storage-path", str(work / "ray-results"), str(work / "job.py"),
        ],
        "TorchTrainer": [
            sys.executable, str(work / "torch_trainer.py"), address,
        ],
    }  # fmt: skip
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in launchers}
    try:
        for round_index in range(args.repeats):
            for name, command in launchers.items():
                out = work / f"out-{name}-{round_index}"
                extra = (
                    [str(out)] if name != "TorchTrainer" else [str(out), str(work / "ray-results")]
                )
                samples[name].append(time_launch([*command, *extra], out))
                print(
                    f"round {round_index + 1}/{args.repeats} {name:13s} {samples[name][-1]}",
                    flush=True,
                )
    finally:
        if args.address is None:
            subprocess.run(
                [str(Path(sys.executable).with_name("ray")), "stop", "--force"],
                capture_output=True,
                timeout=120,
                env=clean_env(),
            )
        shutil.rmtree(ray_temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in ("ready_s", "total_s")}
        for name, runs in samples.items()
    }
    pairs = [
        (base, key) for base in ("trainkit-run", "TorchTrainer") for key in ("ready_s", "total_s")
    ]
    ratios = {
        f"trainkit-ray / {base} ({key})": statistics.median(
            ours[key] / theirs[key]
            for ours, theirs in zip(samples["trainkit-ray"], samples[base], strict=True)
        )
        for base, key in pairs
    }
    ratios_of_medians = {
        f"trainkit-ray / {base} ({key})": medians["trainkit-ray"][key] / medians[base][key]
        for base, key in pairs
    }
    print(f"\n{'launcher':14s} {'ready_s':>9s} {'total_s':>9s}   (medians of {args.repeats})")
    for name, figures in medians.items():
        print(f"{name:14s} {figures['ready_s']:9.2f} {figures['total_s']:9.2f}")
    print(f"\n{'ratio':40s} {'per round':>9s} {'of medians':>10s}")
    for label, ratio in ratios.items():
        print(f"{label:40s} {ratio:8.2f}x {ratios_of_medians[label]:9.2f}x")
    results = {
        "repeats": args.repeats,
        "workers": 2,
        "cluster": "given" if args.address else "local head started by the benchmark, 2 CPUs",
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "ratios_of_medians": ratios_of_medians,
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "launch_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
