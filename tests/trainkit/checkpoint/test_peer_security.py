"""Hostile or broken peers against a real replica server on loopback: each is refused with a logged
reason, nothing partial becomes visible, and the server goes on serving honest peers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.trainkit.checkpoint.test_peer import TOKEN, make_snapshot, tree
from trainkit.checkpoint.peer import (
    ReplicaServer,
    ReplicationError,
    fetch_snapshot,
    list_snapshots,
    push_snapshot,
)
from trainkit.checkpoint.peer.protocol import CONTROL, MAGIC, PREFIX, Channel
from trainkit.checkpoint.peer.throttle import TokenBucket

pytestmark = pytest.mark.timeout(60)

LOGGER = "trainkit.checkpoint.peer"


@pytest.fixture
def server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[ReplicaServer]:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with ReplicaServer(str(tmp_path / "replicas"), host="127.0.0.1", token=TOKEN) as running:
        yield running


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and "refused" in r.getMessage()
    ]


def assert_still_serving(server: ReplicaServer, tmp_path: Path) -> None:
    """An honest peer's push lands whole after whatever came before."""
    snapshot = make_snapshot(tmp_path / "honest", 9, {"a": 3000, "b/c": 5})
    step = max(server.steps("honest"), default=0) + 1
    push_snapshot(server.address, TOKEN, owner="honest", step=step, directory=str(snapshot))
    assert tree(Path(server.snapshot_path("honest", step))) == tree(snapshot)
    assert os.listdir(Path(server.root) / ".incoming") == []


def raw_session(server: ReplicaServer, token: bytes = TOKEN) -> Channel:
    sock = socket.create_connection(server.address, timeout=10)
    channel = Channel(sock, role="client")
    channel.handshake(token)
    return channel


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sent before it closed (a reset, for unread bytes we sent, ends it too)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def send_and_drain(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` (the server may hang up part way) and read until the server closes."""
    with contextlib.suppress(OSError):  # EPIPE, ECONNRESET, ENOTCONN: it hung up already
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    return read_until_closed(sock)


def visible_steps(server: ReplicaServer) -> list[str]:
    return sorted(
        f"{owner}/{step}"
        for owner in os.listdir(server.root)
        if owner != ".incoming"
        for step in os.listdir(Path(server.root) / owner)
    )


def test_a_wrong_token_is_refused_on_both_sides(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 1, {"a": 100})
    with pytest.raises(
        ReplicationError, match=r"failed its authentication.*same TRAINKIT_JOB_TOKEN"
    ):
        push_snapshot(
            server.address, b"another-token-0123456789", owner="r0", step=1, directory=str(snapshot)
        )
    assert visible_steps(server) == []
    assert any("failed authentication" in message for message in refusals(caplog))
    # A server with another token cannot pass itself off to a client either.
    impostor = ReplicaServer(str(tmp_path / "impostor"), host="127.0.0.1", token=b"x" * 32)
    with impostor, pytest.raises(ReplicationError, match="authentication"):
        list_snapshots(impostor.address, TOKEN, owner="r0")
    assert_still_serving(server, tmp_path)


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"TKR1"],
    ids=["http", "random", "short"],
)
def test_garbage_is_refused_and_the_server_goes_on(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        send_and_drain(sock, garbage)
    assert any(
        "not a trainkit replica frame" in message or "connection closed after" in message
        for message in refusals(caplog)
    ), refusals(caplog)
    assert_still_serving(server, tmp_path)


def test_a_client_refuses_a_server_that_speaks_garbage(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" + b"\0" * 64)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(ReplicationError, match="not a trainkit replica frame"):
            list_snapshots(listener.getsockname(), TOKEN, owner="r0")
        thread.join(timeout=10)


def test_an_oversize_control_frame_is_refused_before_it_is_read(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    channel = raw_session(server)
    with channel.sock:
        send_and_drain(channel.sock, PREFIX.pack(MAGIC, CONTROL, 64 << 20))
    assert any("frame of 67108864 bytes where at most 1048576" in m for m in refusals(caplog))
    assert_still_serving(server, tmp_path)


@pytest.mark.parametrize(
    ("request_body", "reason"),
    [
        (
            {"op": "push", "owner": "../evil", "step": 1, "checksum": "crc32", "files": []},
            "replica owner",
        ),
        ({"op": "fetch", "owner": "..", "step": 1}, "replica owner"),
        ({"op": "list", "owner": "a/b"}, "replica owner"),
        (
            {
                "op": "push",
                "owner": "r0",
                "step": 1,
                "checksum": "crc32",
                "files": [{"path": "../../x", "size": 1}],
            },
            "snapshot file name '../../x'",
        ),
        (
            {
                "op": "push",
                "owner": "r0",
                "step": 1,
                "checksum": "crc32",
                "files": [{"path": "/tmp/x", "size": 1}],
            },
            "snapshot file name '/tmp/x'",
        ),
        (
            {"op": "push", "owner": "r0", "step": -1, "checksum": "crc32", "files": []},
            "replica step -1",
        ),
        (
            {"op": "push", "owner": "r0", "step": 1, "checksum": "md5", "files": []},
            "unknown checksum 'md5'",
        ),
        ({"op": "exec", "owner": "r0"}, None),
    ],
    ids=[
        "owner-dotdot",
        "fetch-owner",
        "owner-slash",
        "file-dotdot",
        "file-absolute",
        "step",
        "checksum",
        "op",
    ],
)
def test_requests_with_bad_names_are_refused_with_the_reason(
    server: ReplicaServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request_body: dict,
    reason: str | None,
) -> None:
    channel = raw_session(server)
    with channel.sock:
        channel.send_control(request_body)
        if reason is None:  # an unknown request: closed without an answer
            assert read_until_closed(channel.sock) == b""
            assert any("unknown request 'exec'" in m for m in refusals(caplog))
        else:
            answer = channel.receive_control()
            assert answer["ok"] is False and reason in answer["error"]
            assert any(reason in m for m in refusals(caplog))
    assert visible_steps(server) == [] and not (tmp_path / "evil").exists()
    assert_still_serving(server, tmp_path)


def start_push(server: ReplicaServer, files: list[dict]) -> Channel:
    channel = raw_session(server)
    channel.send_control(
        {"op": "push", "owner": "r0", "step": 5, "checksum": "crc32", "files": files}
    )
    assert channel.receive_control() == {"ok": True}
    return channel


def test_a_file_bigger_than_announced_is_refused(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    channel = start_push(server, [{"path": "a", "size": 10}])
    with channel.sock:
        channel.send_data(memoryview(b"x" * 100))
        read_until_closed(channel.sock)
    assert any(
        "file 'a' (10 bytes announced, 10 left): frame of 100 bytes" in m for m in refusals(caplog)
    )
    wait_for(lambda: os.listdir(Path(server.root) / ".incoming") == [], "the partial push removed")
    assert visible_steps(server) == []
    assert_still_serving(server, tmp_path)


def test_a_truncated_stream_leaves_nothing_visible(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    channel = start_push(server, [{"path": "a", "size": 1 << 20}, {"path": "b", "size": 10}])
    with channel.sock:
        channel.send_data(memoryview(b"x" * (1 << 19)))
        wait_for(lambda: os.listdir(Path(server.root) / ".incoming") != [], "the push staged")
    wait_for(lambda: os.listdir(Path(server.root) / ".incoming") == [], "the partial push removed")
    wait_for(
        lambda: any("connection closed after 0 of 9" in m for m in refusals(caplog)), "the log"
    )
    assert visible_steps(server) == []
    assert_still_serving(server, tmp_path)


class RecordingProxy:
    """Forwards one connection to ``upstream``, recording (and optionally altering) what the client
    sent; ``downstream_rate_bytes_per_s`` makes the link back to the client slow."""

    def __init__(
        self,
        upstream: tuple[str, int],
        alter: Callable[[int, bytes], bytes] | None = None,
        downstream_rate_bytes_per_s: float | None = None,
    ):
        self.upstream = upstream
        self.alter = alter
        self.bucket = (
            TokenBucket(downstream_rate_bytes_per_s, burst_bytes=16384)
            if downstream_rate_bytes_per_s
            else None
        )
        self.client_bytes = bytearray()
        self.forwarded_to_client = 0  # bytes passed on from upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.upstream)

        def pump(source: socket.socket, sink: socket.socket, record: bool) -> None:
            try:
                while data := source.recv(16384 if self.bucket else 65536):
                    if not record and self.bucket is not None:
                        self.bucket.consume(len(data))
                    if not record:
                        self.forwarded_to_client += len(data)
                    if record:
                        if self.alter is not None:
                            data = self.alter(len(self.client_bytes), data)
                        self.client_bytes += data
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (sink, source):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(server, client, False), daemon=True)
        back.start()
        pump(client, server, True)
        back.join(timeout=10)
        client.close()
        server.close()
        self.listener.close()


def test_a_recorded_session_replayed_to_a_server_is_refused(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 2, {"a": 200_000})
    proxy = RecordingProxy(server.address)
    push_snapshot(proxy.address, TOKEN, owner="r0", step=3, directory=str(snapshot))
    proxy.thread.join(timeout=10)
    assert server.steps("r0") == [3]
    recorded = bytes(proxy.client_bytes)

    with ReplicaServer(str(tmp_path / "fresh"), host="127.0.0.1", token=TOKEN) as fresh:
        with socket.create_connection(fresh.address, timeout=10) as sock:
            send_and_drain(sock, recorded)
        assert fresh.steps("r0") == []
        assert fresh.stats["refused"] == 1 and fresh.stats["snapshots_received"] == 0
    assert any("failed authentication" in m for m in refusals(caplog))


def test_bytes_altered_in_flight_are_refused(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 5, {"a": 9 << 20})

    def flip_one_byte(offset: int, data: bytes) -> bytes:
        target = (6 << 20) - offset  # in the second of three data frames, with others in flight
        if 0 <= target < len(data):
            data = data[:target] + bytes([data[target] ^ 1]) + data[target + 1 :]
        return data

    proxy = RecordingProxy(server.address, alter=flip_one_byte)
    with pytest.raises(ReplicationError, match="failed its authentication"):
        push_snapshot(proxy.address, TOKEN, owner="r0", step=3, directory=str(snapshot))
    assert visible_steps(server) == []
    assert any("failed authentication" in m for m in refusals(caplog))
    wait_for(lambda: os.listdir(Path(server.root) / ".incoming") == [], "the partial push removed")
    assert_still_serving(server, tmp_path)


def test_the_server_binds_only_the_host_it_is_given(server: ReplicaServer) -> None:
    assert server.address[0] == "127.0.0.1"
    with ReplicaServer(server.root + "-2", host="127.0.0.2", token=TOKEN) as other:
        assert other.address[0] == "127.0.0.2"
        with pytest.raises(ReplicationError, match="NetworkPolicy"):
            list_snapshots(("127.0.0.1", other.address[1]), TOKEN, owner="r0", timeout_s=5)
        assert list_snapshots(other.address, TOKEN, owner="r0") == []


def test_json_headers_are_never_more_than_data(server: ReplicaServer) -> None:
    """A control frame whose JSON is an array or invalid is refused (nothing but objects is read)."""
    for body in (b"[1, 2]", b"{not json"):
        channel = raw_session(server)
        with channel.sock:
            channel._send(CONTROL, body)
            assert read_until_closed(channel.sock) == b""
    assert json.dumps(server.stats["refused"]) == "2"


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (what it sent before is read and dropped)."""
    while True:
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True


def test_a_peer_that_trickles_bytes_cannot_hold_a_connection_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    root = str(tmp_path / "replicas")
    server = ReplicaServer(root, host="127.0.0.1", token=TOKEN, io_timeout_s=2.0, max_connections=1)
    with server, socket.create_connection(server.address, timeout=10) as slow:
        slow.settimeout(None)  # blocking, so that MSG_DONTWAIT polls instead of waiting
        hello = PREFIX.pack(MAGIC, 0, 32) + os.urandom(32)  # a valid hello, one byte at a time
        sent = 0
        # Each byte comes well inside io_timeout_s; the deadline to authenticate ends it anyway.
        while sent < len(hello) and not closed_by_server(slow):
            with contextlib.suppress(OSError):
                slow.sendall(hello[sent : sent + 1])
            sent += 1
            time.sleep(0.2)
        assert sent < len(hello), "the trickling peer kept its slot for the whole hello"
        wait_for(lambda: server.stats["refused"] == 1, "the slow peer refused")
        assert any("did not authenticate within 2.0 s" in m for m in refusals(caplog))
        assert_still_serving(server, tmp_path)


def test_connections_over_the_limit_are_closed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    root = str(tmp_path / "replicas")
    server = ReplicaServer(root, host="127.0.0.1", token=TOKEN, max_connections=1)
    with server, socket.create_connection(server.address, timeout=10) as idle:
        idle.sendall(b"T")
        with socket.create_connection(server.address, timeout=10) as second:
            assert read_until_closed(second) == b""  # the one slot is taken: closed at once
        assert any("maximum number of connections" in m for m in refusals(caplog))
        idle.close()
        wait_for(lambda: not server._connections, "the slot freed")
        assert_still_serving(server, tmp_path)


def test_a_stored_replica_cut_short_at_rest_is_not_served_and_the_server_goes_on(
    server: ReplicaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = make_snapshot(tmp_path / "snap", 6, {"a": 6 << 20, "b": 10})
    push_snapshot(server.address, TOKEN, owner="r0", step=1, directory=str(snapshot))
    os.truncate(Path(server.snapshot_path("r0", 1)) / "a", 5 << 20)
    with pytest.raises(ReplicationError, match="fetch of r0 step 1"):
        fetch_snapshot(server.address, TOKEN, owner="r0", step=1, dest=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert any("reading the stored replica failed" in m and "ended" in m for m in refusals(caplog))
    assert_still_serving(server, tmp_path)
