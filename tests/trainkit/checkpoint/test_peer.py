"""The peer replica channel on loopback: snapshots arrive byte-exact, listing, retention, byte budget,
fetching back committed-or-invisible, and the throttle's arithmetic."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import yaml

from trainkit.checkpoint.peer import (
    DEFAULT_REPLICA_PORT,
    ReplicaRefusedError,
    ReplicaServer,
    ReplicationError,
    fetch_snapshot,
    list_snapshots,
    push_snapshot,
    token_from_env,
)
from trainkit.checkpoint.peer.layout import (
    RECORD_NAME,
    check_file_list,
    check_relative_path,
    list_snapshot_files,
)
from trainkit.checkpoint.peer.protocol import Channel
from trainkit.checkpoint.peer.throttle import TokenBucket
from trainkit.checkpoint.peer.transfer import receive_files, send_files
from trainkit.env_vars import read_replica_port

pytestmark = pytest.mark.timeout(60)

TOKEN = b"peer-test-token-0123456789abcdef"


def make_snapshot(path: Path, seed: int, sizes: dict[str, int]) -> Path:
    """A snapshot directory with files of the given sizes and contents that depend on ``seed``."""
    for name, size in sizes.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        pattern = bytes((seed * 31 + i) % 251 for i in range(251))
        target.write_bytes((pattern * (size // 251 + 1))[:size])
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(file.relative_to(path)): file.read_bytes()
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.name != RECORD_NAME
    }


@pytest.fixture
def server(tmp_path: Path):
    with ReplicaServer(
        str(tmp_path / "replicas"), host="127.0.0.1", token=TOKEN, keep=2
    ) as running:
        yield running


SIZES = {"model.bin": 9 << 20, "rank/optim.bin": 12345, "rank/nested/rng.json": 17, "empty": 0}


def test_push_then_fetch_is_byte_exact(server: ReplicaServer, tmp_path: Path) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 1, SIZES)
    sent = push_snapshot(server.address, TOKEN, owner="rank-3", step=40, directory=str(snapshot))
    assert sent == sum(SIZES.values())
    stored = Path(server.snapshot_path("rank-3", 40))
    assert stored == tmp_path / "replicas" / "rank-3" / "000000000040"
    assert tree(stored) == tree(snapshot)
    assert list_snapshots(server.address, TOKEN, owner="rank-3") == [40]
    assert list_snapshots(server.address, TOKEN, owner="rank-4") == []

    dest = tmp_path / "restored" / "step"
    got = fetch_snapshot(server.address, TOKEN, owner="rank-3", step=40, dest=str(dest))
    assert got == sent and tree(dest) == tree(snapshot)
    assert not (dest / RECORD_NAME).exists()
    assert [p.name for p in dest.parent.iterdir()] == ["step"]  # no temporary left beside it
    assert server.stats["bytes_received"] == sent and server.stats["bytes_sent"] == sent


def test_keep_bounds_the_steps_per_owner_and_stale_pushes_are_refused(
    server: ReplicaServer, tmp_path: Path
) -> None:
    for step in (10, 20, 30):
        snapshot = make_snapshot(tmp_path / f"s{step}", step, {"a": 1000 + step})
        push_snapshot(server.address, TOKEN, owner="node-1", step=step, directory=str(snapshot))
    push_snapshot(server.address, TOKEN, owner="node-2", step=10, directory=str(tmp_path / "s10"))
    assert server.steps("node-1") == [20, 30] and server.steps("node-2") == [10]
    assert server.stored_bytes == 1020 + 1030 + 1010
    with pytest.raises(ReplicaRefusedError, match=r"step 15 of node-1 is older than the 2 newer"):
        push_snapshot(
            server.address, TOKEN, owner="node-1", step=15, directory=str(tmp_path / "s10")
        )
    # The same step again replaces the stored copy whole.
    push_snapshot(server.address, TOKEN, owner="node-1", step=30, directory=str(tmp_path / "s10"))
    assert tree(Path(server.snapshot_path("node-1", 30))) == tree(tmp_path / "s10")
    assert server.stored_bytes == 1020 + 1010 + 1010


def test_max_bytes_refuses_a_snapshot_that_does_not_fit_after_retiring_old_steps(
    tmp_path: Path,
) -> None:
    root = tmp_path / "replicas"
    small = make_snapshot(tmp_path / "small", 1, {"a": 4000})
    big = make_snapshot(tmp_path / "big", 2, {"a": 9000})
    with ReplicaServer(
        str(root), host="127.0.0.1", token=TOKEN, keep=2, max_bytes=10_000
    ) as server:
        push_snapshot(server.address, TOKEN, owner="r0", step=1, directory=str(small))
        push_snapshot(server.address, TOKEN, owner="r0", step=2, directory=str(small))
        # Step 3 retires step 1 on commit; it goes early to make room, step 2 stays.
        push_snapshot(server.address, TOKEN, owner="r0", step=3, directory=str(small))
        assert server.steps("r0") == [2, 3]
        with pytest.raises(
            ReplicaRefusedError, match=r"needs 9000 bytes.*holds 8000 of its max_bytes=10000"
        ):
            push_snapshot(server.address, TOKEN, owner="r1", step=1, directory=str(big))
        assert server.steps("r1") == [] and server.steps("r0") == [2, 3]
    # A restarted server indexes what is stored and keeps enforcing the budget.
    with ReplicaServer(str(root), host="127.0.0.1", token=TOKEN, keep=2, max_bytes=10_000) as again:
        assert again.stored_bytes == 8000 and again.steps("r0") == [2, 3]
        assert list_snapshots(again.address, TOKEN, owner="r0") == [2, 3]


def test_fetch_refuses_missing_steps_and_existing_destinations(
    server: ReplicaServer, tmp_path: Path
) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 3, {"a": 10})
    push_snapshot(server.address, TOKEN, owner="rank-0", step=7, directory=str(snapshot))
    with pytest.raises(
        ReplicaRefusedError, match=r"no complete replica of rank-0 step 8 here \(have \[7\]\)"
    ):
        fetch_snapshot(server.address, TOKEN, owner="rank-0", step=8, dest=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        fetch_snapshot(server.address, TOKEN, owner="rank-0", step=7, dest=str(snapshot))


def test_fetch_refuses_a_replica_damaged_at_rest(server: ReplicaServer, tmp_path: Path) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 4, {"a": 5000})
    push_snapshot(server.address, TOKEN, owner="rank-0", step=1, directory=str(snapshot))
    stored = Path(server.snapshot_path("rank-0", 1)) / "a"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ReplicationError, match=r"file 'a': checksum mismatch.*another tier"):
        fetch_snapshot(server.address, TOKEN, owner="rank-0", step=1, dest=str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["replicas", "snap"]


def test_an_unreachable_peer_is_named_with_the_fix(tmp_path: Path) -> None:
    with ReplicaServer(str(tmp_path / "r"), host="127.0.0.1", token=TOKEN) as server:
        address = server.address
    with pytest.raises(
        ReplicationError, match=rf"replica peer 127.0.0.1:{address[1]}: listing .*NetworkPolicy"
    ):
        list_snapshots(address, TOKEN, owner="rank-0", timeout_s=5)


def test_names_that_leave_the_snapshot_are_refused_before_any_io(tmp_path: Path) -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", RECORD_NAME, "a\0b", ""):
        with pytest.raises(ValueError, match="snapshot file name"):
            check_relative_path(bad)
    with pytest.raises(ValueError, match="also a directory"):
        check_file_list([{"path": "a", "size": 1}, {"path": "a/b", "size": 1}])
    with pytest.raises(ValueError, match="replica owner"):
        push_snapshot(("127.0.0.1", 1), TOKEN, owner="../rank-0", step=1, directory=str(tmp_path))
    (tmp_path / "link").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="not a regular file"):
        push_snapshot(("127.0.0.1", 1), TOKEN, owner="rank-0", step=1, directory=str(tmp_path))


def test_server_arguments_and_environment() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ReplicaServer("/nonexistent", host="127.0.0.1", token=b"short")
    with pytest.raises(ValueError, match="keep=0"):
        ReplicaServer("/nonexistent", host="127.0.0.1", token=TOKEN, keep=0)
    assert token_from_env({"TRAINKIT_JOB_TOKEN": TOKEN.decode()}) == TOKEN
    assert token_from_env({}) is None
    assert read_replica_port({}) == DEFAULT_REPLICA_PORT == 29410
    assert read_replica_port({"TRAINKIT_REPLICA_PORT": "30000"}) == 30000
    with pytest.raises(ValueError, match=r"TRAINKIT_REPLICA_PORT='x'.*1\.\.65535"):
        read_replica_port({"TRAINKIT_REPLICA_PORT": "x"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_token_bucket_holds_the_average_rate_with_bounded_bursts() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=100, clock=clock, sleep=clock.sleep)
    for _ in range(50):  # it starts empty: from the first byte, never above the rate
        bucket.consume(40)
    assert clock.now == pytest.approx(50 * 40 / 1000)
    clock.now += 10.0  # idle: the bucket refills to its burst, not beyond
    assert bucket.consume(100) == 0.0
    assert bucket.consume(1) > 0
    start = clock.now
    bucket.consume(5000)  # larger than the burst: let through into debt, paid by sleeping
    assert clock.now - start == pytest.approx(5.0)
    with pytest.raises(ValueError, match="rate_bytes_per_s=0"):
        TokenBucket(0)


@pytest.mark.parametrize("workload", ["elastic", "indexed-job", "jobset"])
def test_the_deploy_network_policy_admits_the_replica_port_only_from_the_job(
    workload: str,
) -> None:
    path = Path(__file__).resolve().parents[3] / "deploy/k8s/base" / workload / "networkpolicy.yaml"
    workers = next(
        doc
        for doc in yaml.safe_load_all(path.read_text())
        if doc["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "worker"
    )
    admitting = [
        rule
        for rule in workers["spec"]["ingress"]
        if not rule.get("ports")
        or any(port.get("port") == DEFAULT_REPLICA_PORT for port in rule["ports"])
    ]
    assert admitting, f"{path}: nothing admits the replica port {DEFAULT_REPLICA_PORT}"
    for rule in admitting:  # and only this job's pods
        assert [set(source) for source in rule["from"]] == [{"podSelector"}], rule
        labels = rule["from"][0]["podSelector"]["matchLabels"]
        assert labels["app.kubernetes.io/instance"] == "trainkit-train"


def test_many_frames_in_flight_on_several_threads_arrive_in_order(tmp_path: Path) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 8, {"a": (3 << 20) + 17, "b/c": 70_000, "d": 0})
    files = list_snapshot_files(str(snapshot))
    left, right = socket.socketpair()
    sender, receiver = Channel(left, role="client"), Channel(right, role="server")
    results: dict[str, list[str]] = {}

    def receive() -> None:
        receiver.handshake(TOKEN)
        results["received"] = receive_files(
            receiver, str(tmp_path / "out"), files, checksum="crc32", num_threads=4
        )

    thread = threading.Thread(target=receive)
    thread.start()
    sender.handshake(TOKEN)
    results["sent"] = send_files(
        sender,
        files,
        opener=lambda entry: open(snapshot / entry.path, "rb", buffering=0),  # noqa: SIM115
        checksum="crc32",
        chunk_bytes=64 << 10,  # about 50 frames, up to 6 in flight
        num_threads=4,
    )
    thread.join(timeout=30)
    left.close()
    right.close()
    assert results["sent"] == results["received"]
    assert tree(tmp_path / "out") == tree(snapshot)
