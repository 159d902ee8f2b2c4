"""Memory-first checkpoints across namespace pods, each with a private /dev/shm (its own mount
namespace and tmpfs), in one job: a worker-group restart reads each pod's own memory, a lost pod's
replacement pulls its rank from the peer's replica, neither reads storage, the data position is
exactly once, forged replica traffic is refused while training goes on, and when every memory copy
is gone the job restores from storage with a warning.

Storage is moto's S3 server in a pod of its own, recording every request it serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.integration.podnet import Pod, PodNet, netns_unavailable_reason, podnet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
]

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integration" / "scripts" / "memory_train.py"
JOB_TOKEN = "memory-job-token-0123456789abcdef"
SHM_BYTES = 256 << 20
CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60,store_grace=3"

PROBE = """
import json, socket, sys, tempfile, os
from trainkit.checkpoint.peer import ReplicationError, list_snapshots, push_snapshot
host, port = sys.argv[1].rsplit(":", 1)
address = (host, int(port))
results = {}
with socket.create_connection(address, timeout=5) as sock:
    sock.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n" + os.urandom(4096))
    sock.settimeout(5)
    try:  # the server's greeting (its nonce) may come first; then it must hang up
        while sock.recv(65536):
            pass
        results["garbage"] = "closed"
    except ConnectionResetError:
        results["garbage"] = "closed"
    except OSError as error:
        results["garbage"] = type(error).__name__
directory = tempfile.mkdtemp()
open(os.path.join(directory, "x"), "wb").write(b"forged")
for name, call in (
    ("push", lambda: push_snapshot(address, b"wrong-token-0123456789abcdef", owner="rank-1-of-2",
                                   step=10**6, directory=directory, timeout_s=5)),
    ("list", lambda: list_snapshots(address, b"wrong-token-0123456789abcdef", owner="rank-1-of-2",
                                    timeout_s=5)),
):
    try:
        call()
        results[name] = "accepted"
    except ReplicationError as error:
        results[name] = "refused"
print(json.dumps(results))
"""


def storage_reads(recording: Path, bucket: str) -> list[str]:
    """Object GETs of checkpoint data in ``bucket``: listings, HEADs and commit records (which
    saving reads too, to apply retention) are metadata; DCP and per-rank files are what a restore
    from storage reads."""
    reads = []
    if not recording.exists():
        return reads
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        path = urlparse(entry["url"]).path
        if (
            entry["method"] == "GET"
            and path.startswith(f"/{bucket}/")
            and "/step_" in path
            and not path.endswith("/COMMIT.json")
        ):
            reads.append(path)
    return reads


def records(out: Path) -> list[dict]:
    """Every JSON line the workers wrote."""
    return [
        json.loads(line)
        for path in sorted(out.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, logs: list[Path]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")


def start_s3(pod: Pod, recording: Path, log: Path) -> str:
    endpoint = f"http://{pod.ip}:5000"
    pod.spawn(
        [sys.executable, "-m", "moto.server", "-H", pod.ip, "-p", "5000"],
        env={"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(recording)},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    make_bucket = (
        "import boto3, sys, time\n"
        "for _ in range(150):\n"
        "    try:\n"
        "        boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='testing',\n"
        "            aws_secret_access_key='testing', region_name='us-east-1').create_bucket(Bucket='ckpt')\n"
        "        break\n"
        "    except Exception:\n"
        "        time.sleep(0.2)\n"
    )
    result = pod.run([sys.executable, "-c", make_bucket, endpoint], timeout=60)
    assert result.returncode == 0, result.stderr
    return endpoint


def launch(pod: Pod, env: dict[str, str], log: Path) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "launchers.run", "--nnodes", "2:3", "--nproc-per-node", "1",
        "--rdzv-backend", "k8s", "--rdzv-endpoint", "train:29400", "--rdzv-id", "mem1",
        "--rdzv-conf", CONF, "--max-restarts", "5", "--monitor-interval", "0.2", str(WORKER),
    ]  # fmt: skip
    return pod.spawn(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


def newest(found: list[dict], host: str, kind: str) -> dict | None:
    matching = [r for r in found if r["host"] == host and r["kind"] == kind]
    return matching[-1] if matching else None


def restores_since(out: Path, since: float) -> dict[str, dict]:
    """The newest restore record of each pod after ``since`` that loaded a step."""
    found = [
        r
        for r in records(out)
        if r["kind"] == "restore" and r["t"] > since and r["step"] is not None
    ]
    return {r["host"]: r for r in sorted(found, key=lambda r: r["t"])}


def check_restored(out: Path, restores: dict[str, dict], tiers: dict[str, str]) -> int:
    """Every pod restored the same step from the expected tier, with exactly the tensors and data
    position its rank had at that step (read from the records written before the restore)."""
    assert {host: r["tier"] for host, r in restores.items()} == tiers, restores
    steps = {r["step"] for r in restores.values()}
    assert len(steps) == 1, restores
    step = steps.pop()
    first_restore = min(r["t"] for r in restores.values())
    saved = {
        (r["rank"], r["step"]): r["digest"]
        for r in sorted(records(out), key=lambda r: r["t"])
        if r["kind"] == "step" and r["t"] < first_restore
    }
    for restore in restores.values():
        assert restore["digest"] == saved[(restore["rank"], step)], restore
        assert restore["samples"] == step * 4  # the data position of that step, exactly
    return step


def test_memory_tiers_across_worker_restart_pod_loss_and_lost_memory(
    podnet: PodNet,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    recording = tmp_path / "requests.jsonl"
    s3_pod = podnet.add_pod("s3-0", subdomain=None, in_service=False)
    endpoint = start_s3(s3_pod, recording, tmp_path / "s3.log")
    stop = tmp_path / "STOP"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env.update(
        OUT_DIR=str(out),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        TRAINKIT_JOB_TOKEN=JOB_TOKEN,
        STORAGE_URL="s3://ckpt/run",
        S3_ENDPOINT=endpoint,
        HIDDEN="256",
        MEMORY_EVERY="2",
        STORAGE_EVERY="10",
        KILL_RANK="1",
        KILL_STEP="9",  # rank 1 SIGKILLs itself at step 9 of its first attempt
        STOP_FILE=str(stop),
        STEP_SLEEP_S="0.05",
    )
    logs: list[Path] = []
    processes: dict[str, subprocess.Popen] = {}
    pods: dict[str, Pod] = {}

    def start(name: str) -> None:
        pods[name] = podnet.add_pod(name, shm_bytes=SHM_BYTES)
        logs.append(tmp_path / f"{name}.log")
        processes[name] = launch(pods[name], env, logs[-1])

    def lose(name: str) -> None:
        pods[name].kill()  # launcher, workers and the pod's private /dev/shm
        podnet.unpublish(pods[name])
        processes.pop(name).wait(timeout=10)

    # 1. A worker is SIGKILLed: both worker groups restart and read their own pod's memory.
    start("w-0")
    start("w-1")
    wait_until(lambda: set(restores_since(out, 0)) == {"w-0", "w-1"}, 120, "the restart", logs)
    step = check_restored(out, restores_since(out, 0), {"w-0": "memory", "w-1": "memory"})
    assert step in (6, 8)  # 8 unless the kill beat the write of its snapshot (then 6)

    # 2. Garbage and a wrong token at w-0's replica server: refused; the job goes on.
    address = restores_since(out, 0)["w-0"]["replica_address"]
    probe = s3_pod.run([sys.executable, "-c", PROBE, address], env={"PYTHONPATH": str(REPO)})
    assert probe.returncode == 0, probe.stderr
    verdict = json.loads(probe.stdout.strip().splitlines()[-1])
    assert verdict == {"garbage": "closed", "push": "refused", "list": "refused"}, verdict

    def replicated_past(step: int) -> bool:
        last = newest(records(out), "w-1", "step")
        return last is not None and (last["replicated"] or -1) > step

    wait_until(lambda: replicated_past(14), 60, "w-1 replicating past step 14", logs)

    # 3. Pod w-1 is lost; a replacement with an empty /dev/shm pulls rank 1 from w-0's replica.
    lost_at = time.time()
    lose("w-1")
    start("w-2")
    wait_until(
        lambda: set(restores_since(out, lost_at)) == {"w-0", "w-2"}, 120, "the pod loss", logs
    )
    step = check_restored(out, restores_since(out, lost_at), {"w-0": "memory", "w-2": "peer"})
    assert step > 14
    # Exactly once: each rank goes on at the sample after the restored step.
    wait_until(
        lambda: any(
            r["kind"] == "step" and r["t"] > lost_at and r["host"] == "w-2" for r in records(out)
        ),
        30,
        "the replacement training",
        logs,
    )
    resumed = [
        r
        for r in records(out)
        if r["kind"] == "step" and r["t"] > lost_at and r["step"] == step + 1
    ]
    assert {r["first_sample"] for r in resumed} == {step * 4}
    assert storage_reads(recording, "ckpt") == []  # memory and the peer only, so far

    # 4. Both pods are lost, memory and replicas with them: storage, with a warning.
    lost_at = time.time()
    lose("w-0")
    lose("w-2")
    start("w-3")
    start("w-4")
    wait_until(
        lambda: set(restores_since(out, lost_at)) == {"w-3", "w-4"},
        120,
        "the storage restore",
        logs,
    )
    step = check_restored(out, restores_since(out, lost_at), {"w-3": "storage", "w-4": "storage"})
    assert step % 10 == 0
    assert storage_reads(recording, "ckpt")
    stop.write_text("stop")
    for name, process in processes.items():
        assert process.wait(timeout=60) == 0, f"{name}: " + logs[-1].read_text()[-3000:]
    assert (
        "no step has a complete memory copy on every rank"
        in logs[-2].read_text() + logs[-1].read_text()
    )
