"""Launch overhead of trainkit-ray against trainkit-run and Ray Train's own TorchTrainer.

    .venv/bin/python benchmarks/launch_overhead.py                  # starts a local Ray head (2 CPUs)
    .venv/bin/python benchmarks/launch_overhead.py --repeats 5 --steps 300
    .venv/bin/python benchmarks/launch_overhead.py --address HOST:PORT   # an existing cluster

One training loop, 2 processes on this machine: DDP on a small MLP fed by ``shards.ShardedLoader``
(gloo). Three launchers, alternating in each round: ``trainkit-run --standalone`` (baseline),
``trainkit-ray`` on a running Ray cluster, and Ray Train's ``TorchTrainer`` running the very same
loop in its worker actors on the process group Ray Train created (what a Ray user would write
instead; ``trainkit.init()`` joins that group). Figures: launch to every rank past its first step
(``first_step_s``), launch to launcher exit (``total_s``), and steps/s after the first step (slowest
rank). Ratios trainkit-ray / trainkit-run and trainkit-ray / TorchTrainer, primary: the median of
per-round ratios (one round's launches run back to back and share the machine's load); also the
ratio of medians. Goal: trainkit-ray within 10% of TorchTrainer's start-up, same steps/s. Writes
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

JOB = """import json, sys, time
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import trainkit
from shards import ShardedDataset, ShardedLoader


def main(data, out, num_steps):
    world = trainkit.init(backend="gloo")  # under TorchTrainer: Ray Train's group, already formed
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = iter(ShardedLoader(ShardedDataset(data, batch_size=64, world=world), num_workers=0))

    def step():
        batch = next(batches)
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    first_step = time.time()
    started = time.perf_counter()
    for _ in range(num_steps):
        step()
    steps_per_s = num_steps / (time.perf_counter() - started)
    with open(f"{out}/rank-{world.rank}.json", "w") as handle:
        json.dump({"first_step": first_step, "steps_per_s": steps_per_s}, handle)
    trainkit.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""

TORCH_TRAINER = """import runpy, sys
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

job, address, data, out, num_steps, storage = sys.argv[1:]


def work(config):
    runpy.run_path(config["job"])["main"](config["data"], config["out"], config["num_steps"])


ray.init(address=address, log_to_driver=False)
TorchTrainer(
    work,
    train_loop_config={"job": job, "data": data, "out": out, "num_steps": int(num_steps)},
    scaling_config=ScalingConfig(num_workers=2),
    run_config=RunConfig(storage_path=storage),
).fit()
"""


def write_dataset(url: str) -> None:
    import numpy as np
    import pyarrow as pa

    from shards import write_shards

    generator = np.random.default_rng(0)
    inputs = generator.standard_normal((65_536, 32), dtype=np.float32)
    labels = inputs[:, :4] * 0.5
    table = pa.table(
        {
            "x": pa.FixedSizeListArray.from_arrays(pa.array(inputs.ravel()), 32),
            "y": pa.FixedSizeListArray.from_arrays(pa.array(labels.ravel()), 4),
        }
    )
    write_shards(table, url, bytes_per_shard=2 << 20, row_group_bytes=256 << 10, progress=False)


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
    if len(records) != 2:
        raise RuntimeError(f"{command[:3]}: expected 2 ranks, got {records}")
    shutil.rmtree(out)
    return {
        "first_step_s": max(r["first_step"] for r in records) - started,
        "total_s": total_s,
        "steps_per_s": min(r["steps_per_s"] for r in records),
    }


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


KEYS = ("first_step_s", "total_s", "steps_per_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="launches per launcher (default 3)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps after the first")
    parser.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: start one)"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="results folder"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tk-launch-"))
    job, data, storage = work / "job.py", str(work / "shards"), str(work / "ray-results")
    job.write_text(JOB)
    (work / "torch_trainer.py").write_text(TORCH_TRAINER)
    write_dataset(data)
    ray_temp = tempfile.mkdtemp(prefix="tkray-", dir="/tmp")  # Ray's socket paths must stay short
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        address = args.address or start_cluster(ray_temp)
        launchers = {
            "trainkit-run": [
                sys.executable, "-m", "launchers.run", "--standalone", "--nproc-per-node", "2",
                str(job), data, "{out}", str(args.steps),
            ],
            "trainkit-ray": [
                sys.executable, "-m", "launchers.ray.cli", "--address", address, "--num-workers",
                "2", "--storage", storage, str(job), data, "{out}", str(args.steps),
            ],
            "TorchTrainer": [
                sys.executable, str(work / "torch_trainer.py"), str(job), address, data, "{out}",
                str(args.steps), storage,
            ],
        }  # fmt: skip
        samples = {name: [] for name in launchers}
        for round_index in range(args.repeats):
            for name, command in launchers.items():
                out = work / f"out-{name}-{round_index}"
                argv = [str(out) if part == "{out}" else part for part in command]
                samples[name].append(time_launch(argv, out))
                figures = ", ".join(f"{k} {v:.2f}" for k, v in samples[name][-1].items())
                print(f"round {round_index + 1}/{args.repeats} {name:13s} {figures}", flush=True)
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
        name: {key: statistics.median(s[key] for s in runs) for key in KEYS}
        for name, runs in samples.items()
    }
    pairs = [(base, key) for base in ("trainkit-run", "TorchTrainer") for key in KEYS]
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
    print(f"\n{'launcher':14s} {'first_step_s':>12s} {'total_s':>9s} {'steps/s':>9s}   (medians)")
    for name, figures in medians.items():
        print(
            f"{name:14s} {figures['first_step_s']:12.2f} {figures['total_s']:9.2f} "
            f"{figures['steps_per_s']:9.1f}"
        )
    print(f"\n{'ratio':44s} {'per round':>9s} {'of medians':>10s}")
    for label, ratio in ratios.items():
        print(f"{label:44s} {ratio:8.2f}x {ratios_of_medians[label]:9.2f}x")
    results = {
        "repeats": args.repeats,
        "workers": 2,
        "timed_steps": args.steps,
        "cluster": "given" if args.address else "local head started by the benchmark, 2 CPUs",
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "ratios_of_medians": ratios_of_medians,
        "goal": "trainkit-ray / TorchTrainer: first_step_s <= 1.10, steps_per_s ~ 1.0",
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "launch_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
