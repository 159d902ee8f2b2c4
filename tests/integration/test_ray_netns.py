"""trainkit-ray on a two-node Ray cluster whose nodes are namespace pods (own IPs, hostnames, pod
variables): torchrun's multi-node environment, and a crash resumed bit-exactly across pods."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.podnet import Pod, PodNet, netns_unavailable_reason
from tests.integration.scripts.ray_cluster import RAY, ray_env
from tests.integration.test_ray_launcher import (
    PROBE,
    STEPS,
    TRAIN,
    assert_same_training,
    dataset,
    read_records,
    reference,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
]

TRAINKIT_RAY = [sys.executable, "-m", "launchers.ray.cli"]
GCS_PORT = 6379


def ray_start(pod: Pod, *args: str) -> None:
    started = pod.run(
        [
            RAY,
            "start",
            f"--node-ip-address={pod.ip}",
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            *args,
        ],
        env=ray_env(**pod.env),
        timeout=240,
    )
    assert started.returncode == 0, started.stderr[-3000:]


@pytest.fixture(scope="module")
def ray_pods() -> Iterator[tuple[Pod, Pod]]:
    """A Ray head pod and a Ray worker pod, one CPU each, so two workers land on two nodes."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install trainkit[ray])")
    with PodNet(service="raycluster") as net:
        head, worker = net.add_pod("ray-head-0"), net.add_pod("ray-worker-0")
        try:
            ray_start(head, "--head", f"--port={GCS_PORT}", "--include-dashboard=false")
            ray_start(worker, f"--address={head.ip}:{GCS_PORT}")
            yield head, worker
        finally:
            subprocess.run(
                [RAY, "stop", "--force"], capture_output=True, timeout=120, env=ray_env()
            )


def launch_in(pod: Pod, *args: str) -> tuple[int, str]:
    """Run trainkit-ray in ``pod`` (as a RayJob runs its entrypoint on the head)."""
    process = pod.spawn(
        [*TRAINKIT_RAY, "--address", f"{pod.ip}:{GCS_PORT}", *args],
        env=ray_env(**pod.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
    return process.returncode, output


def test_workers_on_two_pods_get_torchruns_multi_node_environment(
    ray_pods: tuple[Pod, Pod], tmp_path: Path
) -> None:
    head, worker = ray_pods
    code, output = launch_in(head, "--num-workers", "2", str(PROBE), str(tmp_path))
    assert code == 0, output[-4000:]
    records = read_records(tmp_path)
    assert sorted(records) == ["rank-0-restart-0", "rank-1-restart-0"]
    pods = {head.hostname: head, worker.hostname: worker}
    rank0_pod = pods[records["rank-0-restart-0"]["env"]["POD_NAME"]]
    for rank in (0, 1):
        env = records[f"rank-{rank}-restart-0"]["env"]
        world = records[f"rank-{rank}-restart-0"]["world"]
        assert world["source"] == "torchrun"
        assert (world["rank"], world["world_size"], world["num_nodes"]) == (rank, 2, 2)
        assert (world["local_rank"], world["local_world_size"]) == (0, 1)
        assert env["GROUP_RANK"] == str(rank) and env["GROUP_WORLD_SIZE"] == "2"
        # The store lives with rank 0, on its pod's address, as torchrun's agent on node 0.
        assert env["MASTER_ADDR"] == rank0_pod.ip
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert {records[f"rank-{r}-restart-0"]["env"]["POD_NAME"] for r in (0, 1)} == set(pods)
    run_ids = {records[f"rank-{r}-restart-0"]["env"]["TORCHELASTIC_RUN_ID"] for r in (0, 1)}
    assert len(run_ids) == 1, run_ids


def test_a_crash_on_one_pod_resumes_bit_exactly_across_pods(
    ray_pods: tuple[Pod, Pod], dataset: str, reference: Path, tmp_path: Path
) -> None:
    head, _ = ray_pods
    out = tmp_path / "out"
    code, output = launch_in(
        head,
        *("--num-workers", "2", "--max-failures", "1", str(TRAIN)),
        *("--data", dataset, "--root", str(tmp_path / "ckpt"), "--out", str(out)),
        *("--steps", str(STEPS), "--fail-at", "13"),
    )
    assert code == 0, output[-4000:]
    # Two ranks on two pods all-reduce in the same order as two on one machine: same bits.
    assert_same_training(reference, out)
