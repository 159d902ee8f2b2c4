"""Collectives across namespace pods: a gloo sweep, and pairwise mode finding a `tc`-throttled link.

Four pods on a bridge (tests/integration/podnet.py), one torchrun agent + worker per pod. One pod's
veth is rate-limited with a token bucket in both directions; the pairwise benchmark must name it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.podnet import PodNet, netns_unavailable_reason, podnet
from trainkit.comms.formulas import bus_factor

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
]

NUM_PODS = 4
THROTTLED = 2
RATE = "80mbit"  # 10 MB/s, far below what a veth pair does here


def launch_everywhere(
    net: PodNet, pods: list, port: int, bench_args: list[str], timeout_s: float = 150
) -> list[str]:
    """Run ``-m trainkit.comms.bench`` under torchrun in every pod; return each pod's output."""
    processes = []
    for node, pod in enumerate(pods):
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(len(pods)),
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--master-addr",
            pods[0].ip,
            "--master-port",
            str(port),
            "-m",
            "trainkit.comms.bench",
            *bench_args,
        ]
        env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "TRAINKIT_COMMS_APPLIED": ""}
        processes.append(
            pod.spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [process.communicate(timeout=timeout_s)[0] for process in processes]
    codes = [process.returncode for process in processes]
    assert codes == [0] * len(pods), "\n----\n".join(output[-2000:] for output in outputs)
    return outputs


def throttle(net: PodNet, pod, rate: str) -> None:
    """A token-bucket limit on both ends of the pod's veth: the host side (traffic into the pod) and
    the pod's eth0 (traffic out of it)."""
    index = pod.name.rsplit("-", 1)[1]
    tbf = ["root", "tbf", "rate", rate, "burst", "32kb", "latency", "100ms"]
    subprocess.run(
        ["tc", "qdisc", "add", "dev", f"tkv{net.uid}{index}", *tbf], check=True, capture_output=True
    )
    subprocess.run(
        ["ip", "netns", "exec", pod.name, "tc", "qdisc", "add", "dev", "eth0", *tbf],
        check=True,
        capture_output=True,
    )


def test_gloo_sweep_and_pairwise_find_the_throttled_pod(podnet: PodNet, tmp_path: Path) -> None:
    pods = [podnet.add_pod(f"w-{i}") for i in range(NUM_PODS)]

    sweep = tmp_path / "sweep.json"
    launch_everywhere(
        podnet,
        pods,
        29610,
        [
            "--ops",
            "all_reduce,all_gather,alltoall",
            "-b",
            "64K",
            "-e",
            "1M",
            "-f",
            "16",
            "-n",
            "3",
            "-w",
            "1",
            "--json",
            str(sweep),
        ],
    )
    document = json.loads(sweep.read_text())
    assert document["world_size"] == NUM_PODS
    for m in document["measurements"]:
        assert m["busbw_gbps"] == pytest.approx(
            m["algbw_gbps"] * bus_factor(m["operation"], NUM_PODS)
        )

    throttle(podnet, pods[THROTTLED], RATE)
    pairs_path = tmp_path / "pairs.json"
    outputs = launch_everywhere(
        podnet,
        pods,
        29611,
        ["--pairwise", "--pair-bytes", "1M", "-n", "5", "-w", "1", "--json", str(pairs_path)],
    )
    document = json.loads(pairs_path.read_text())
    assert len(document["pairs"]) == NUM_PODS * (NUM_PODS - 1) // 2
    report = document["slow_links"]
    assert report["slow_pods"] == [THROTTLED], json.dumps(document["pairs"], indent=1)
    # Every pair with the throttled pod is slow; on a loaded machine a healthy pair may dip too.
    assert {(0, 2), (1, 2), (2, 3)} <= set(map(tuple, report["slow_pairs"]))
    hosts = {
        rank: host
        for p in document["pairs"]
        for rank, host in zip(p["ranks"], p["hosts"], strict=True)
    }
    assert hosts[THROTTLED] == f"w-{THROTTLED}"
    # Throttled pairs run near the token rate; the others far above it.
    slow = [p["gbps"] for p in document["pairs"] if THROTTLED in p["ranks"]]
    fast = [p["gbps"] for p in document["pairs"] if THROTTLED not in p["ranks"]]
    assert max(slow) < 0.012  # 80 Mbit/s = 0.01 GB/s
    assert min(fast) > 5 * max(slow)
    assert f"slow link: rank {THROTTLED} (w-{THROTTLED})" in outputs[0]
