"""Memory-first checkpoints across namespace pods, each with a private /dev/shm: a lost pod's
replacement restores from its peer's replica without reading storage, with the data position
exactly once, and a client with garbage or the wrong job token is refused while training goes on.

Storage is moto's S3 server in a pod of its own, recording every request it serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.integration.podnet import Pod, PodNet, netns_unavailable_reason, podnet  # noqa: F401
from tests.integration.test_checkpoint_memory import WORKER, records, storage_reads

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
]

REPO = Path(__file__).resolve().parents[2]
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


def test_replacement_pod_restores_from_its_peers_memory(podnet: PodNet, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    recording = tmp_path / "requests.jsonl"
    s3_pod = podnet.add_pod("s3-0", subdomain=None, in_service=False)
    endpoint = start_s3(s3_pod, recording, tmp_path / "s3.log")
    stop = tmp_path / "STOP"
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env.update(
        OUT_DIR=str(out),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        LOGLEVEL="INFO",
        TRAINKIT_JOB_TOKEN=JOB_TOKEN,
        STORAGE_URL="s3://ckpt/run",
        S3_ENDPOINT=endpoint,
        HIDDEN="256",
        MEMORY_EVERY="2",
        STORAGE_EVERY="50",
        STOP_FILE=str(stop),
        STEP_SLEEP_S="0.05",
    )
    pods = {name: podnet.add_pod(name, shm_bytes=SHM_BYTES) for name in ("w-0", "w-1")}
    logs = [tmp_path / f"{name}.log" for name in pods]
    processes = [launch(pod, env, log) for pod, log in zip(pods.values(), logs, strict=True)]

    def replicated(step: int) -> bool:
        last = newest(records(out), "w-1", "step")
        return last is not None and (last["replicated"] or -1) >= step

    wait_until(lambda: replicated(6), 90, "w-1 replicating step 6 to w-0", logs)

    # Garbage and a wrong token at w-0's replica server: refused; the job goes on.
    address = newest(records(out), "w-0", "restore")["replica_address"]
    probe = s3_pod.run([sys.executable, "-c", PROBE, address], env={"PYTHONPATH": str(REPO)})
    assert probe.returncode == 0, probe.stderr
    verdict = json.loads(probe.stdout.strip().splitlines()[-1])
    assert verdict["push"] == verdict["list"] == "refused", verdict
    assert verdict["garbage"] == "closed", verdict
    before = newest(records(out), "w-0", "step")["step"]
    wait_until(
        lambda: newest(records(out), "w-0", "step")["step"] >= before + 4,
        30,
        "training going on after the forged requests",
        logs,
    )

    # Lose pod w-1 (launcher, workers, its /dev/shm); a replacement with an empty /dev/shm joins.
    pods["w-1"].kill()
    podnet.unpublish(pods["w-1"])
    replacement = podnet.add_pod("w-2", shm_bytes=SHM_BYTES)
    logs.append(tmp_path / "w-1-new.log")
    processes.append(launch(replacement, env, logs[-1]))

    def restored_everywhere() -> bool:
        found = [r for r in records(out) if r["kind"] == "restore" and r["restart"] is not None]
        return {r["host"] for r in found if r["step"] is not None} == {"w-0", "w-2"}

    wait_until(restored_everywhere, 120, "both pods restoring after the pod loss", logs)
    found = records(out)
    restores = {r["host"]: r for r in found if r["kind"] == "restore" and r["step"] is not None}
    assert restores["w-2"]["tier"] == "peer" and restores["w-0"]["tier"] == "memory", restores
    step = restores["w-0"]["step"]
    assert restores["w-2"]["step"] == step and step >= 6
    # The lost pod's own records say what it had at that step: the replica holds exactly that.
    saved = {
        (r["rank"], r["step"]): r
        for r in found
        if r["kind"] == "step" and r["t"] < restores["w-2"]["t"]
    }
    for restore in restores.values():
        assert restore["digest"] == saved[(restore["rank"], step)]["digest"]
        assert restore["samples"] == step * 4
    wait_until(
        lambda: (newest(records(out), "w-2", "step") or {}).get("t", 0) > restores["w-2"]["t"],
        30,
        "the replacement training",
        logs,
    )
    stop.write_text("stop")
    for process in processes[0:1] + processes[2:]:
        assert process.wait(timeout=60) == 0, logs[-1].read_text()[-3000:]

    # Exactly once: after the restore each rank continues at the sample after the restored step.
    after = [
        r
        for r in records(out)
        if r["kind"] == "step" and r["t"] > restores["w-2"]["t"] and r["step"] == step + 1
    ]
    assert {r["first_sample"] for r in after} == {step * 4}
    assert storage_reads(recording, "ckpt") == []
    assert urlparse(endpoint).port == 5000
