"""The replica channel between two namespace pods: the server bound to one pod's IP on the default
port, a client in the other pod pushes a snapshot, lists it and fetches it back byte-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.podnet import PodNet, netns_unavailable_reason, podnet
from tests.trainkit.checkpoint.test_peer import TOKEN, make_snapshot, tree
from trainkit.checkpoint.peer import DEFAULT_REPLICA_PORT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
]

REPO = Path(__file__).resolve().parents[2]

SERVER = """
import os, sys, time
from trainkit.checkpoint.peer import ReplicaServer, token_from_env
from trainkit.env_vars import read_replica_port
server = ReplicaServer(sys.argv[1], host=os.environ["POD_IP"], port=read_replica_port(os.environ),
                       token=token_from_env())
server.start()
print(*server.address, flush=True)
time.sleep(600)
"""

CLIENT = """
import json, os, sys, time
from trainkit.checkpoint.peer import (ReplicationError, fetch_snapshot, list_snapshots,
                                      push_snapshot, token_from_env)
address, token = (sys.argv[1], int(sys.argv[2])), token_from_env()
for _ in range(600):  # started with the server: wait until it listens
    try:
        assert list_snapshots(address, token, owner="node-1") == []
        break
    except ReplicationError:
        time.sleep(0.1)
sent = push_snapshot(address, token, owner="node-1", step=30, directory=sys.argv[3])
steps = list_snapshots(address, token, owner="node-1")
got = fetch_snapshot(address, token, owner="node-1", step=30, dest=sys.argv[4])
print(json.dumps({"sent": sent, "steps": steps, "fetched": got, "client": os.environ["POD_IP"]}))
"""


def test_a_pod_replicates_to_its_peer_and_fetches_back(podnet: PodNet, tmp_path: Path) -> None:
    holder, owner = podnet.add_pod("w-0"), podnet.add_pod("w-1")
    env = {"PYTHONPATH": str(REPO), "TRAINKIT_JOB_TOKEN": TOKEN.decode()}
    snapshot = make_snapshot(tmp_path / "snap", 7, {"model.bin": 3 << 20, "rank-1/state.json": 99})
    dest = tmp_path / "restored"
    server = holder.spawn(
        [sys.executable, "-c", SERVER, str(tmp_path / "replicas")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    # Both start at once (interpreter start-up dominates); the client waits for the server.
    client = owner.spawn(
        [
            sys.executable,
            "-c",
            CLIENT,
            holder.ip,
            str(DEFAULT_REPLICA_PORT),
            str(snapshot),
            str(dest),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    host, port = server.stdout.readline().split()
    assert (host, int(port)) == (holder.ip, DEFAULT_REPLICA_PORT)
    listening = {line.split()[3] for line in holder.run(["ss", "-Htln"]).stdout.splitlines()}
    assert listening == {f"{holder.ip}:{DEFAULT_REPLICA_PORT}"}  # the pod IP only, no wildcard
    stdout, stderr = client.communicate(timeout=90)
    result = subprocess.CompletedProcess(client.args, client.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    size = (3 << 20) + 99
    assert report == {"sent": size, "steps": [30], "fetched": size, "client": owner.ip}
    assert tree(dest) == tree(snapshot)
    assert tree(tmp_path / "replicas" / "node-1" / "000000000030") == tree(snapshot)
    assert os.listdir(tmp_path / "replicas" / ".incoming") == []
