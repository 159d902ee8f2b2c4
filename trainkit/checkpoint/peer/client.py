"""Talking to a peer's replica server: push a snapshot, list what it holds, fetch one back.

Every call opens one authenticated connection, does one request and closes it. Errors are
``ReplicationError`` naming the peer and what failed; a fetched snapshot appears at ``dest`` only
after every file's size and checksum matched the peer's record.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from trainkit.checkpoint.peer.layout import (
    check_file_list,
    check_owner,
    check_step,
    commit_directory,
    list_snapshot_files,
    remove_tree,
)
from trainkit.checkpoint.peer.protocol import (
    MAX_DATA_BYTES,
    Channel,
    ProtocolError,
    ReplicaRefusedError,
    ReplicationError,
    default_checksum,
)
from trainkit.checkpoint.peer.throttle import TokenBucket
from trainkit.checkpoint.peer.transfer import (
    LocalReadError,
    LocalWriteError,
    PeerAnswered,
    receive_files,
    send_files,
)
from trainkit.k8s.signed_state import read_job_token

__all__ = ["fetch_snapshot", "list_snapshots", "push_snapshot", "token_from_env"]

Address = tuple[str, int]

_MIN_THROTTLED_CHUNK_BYTES = 64 << 10


def token_from_env(env: Mapping[str, str] = os.environ) -> bytes | None:
    """The job token (``TRAINKIT_JOB_TOKEN``, from a Secret) or None; ValueError if too short."""
    return read_job_token(env)


@contextlib.contextmanager
def _session(address: Address, token: bytes, timeout_s: float, what: str) -> Iterator[Channel]:
    """An authenticated channel to ``address``; failures become ReplicationError naming ``what``."""
    address = (address[0], int(address[1]))
    try:
        with socket.create_connection(address, timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = Channel(sock, role="client")
            channel.handshake(token)
            yield channel
    except ReplicationError:
        raise
    except ProtocolError as error:
        raise ReplicationError(f"{what}: {error}", address=address) from None
    except OSError as error:
        raise ReplicationError(
            f"{what}: {error}; check that the peer's replica server runs on this address and that "
            "a NetworkPolicy lets this pod reach its port",
            address=address,
        ) from None


def _answer(channel: Channel, address: Address, what: str) -> dict[str, Any]:
    reply = channel.receive_control()
    if reply.get("ok") is not True:
        raise ReplicaRefusedError(
            f"{what}: refused: {str(reply.get('error'))[:2000]}", address=address
        )
    return reply


def push_snapshot(
    address: Address,
    token: bytes,
    *,
    owner: str,
    step: int,
    directory: str,
    rate_bytes_per_s: float | None = None,
    timeout_s: float = 60.0,
) -> int:
    """Replicate the snapshot ``directory`` to the peer as ``owner``'s ``step``; the bytes sent.

    The peer makes it visible only once every file arrived whole and verified. ``rate_bytes_per_s``
    caps the average send rate (None: as fast as the link allows); ``timeout_s`` is the longest
    any one send or receive may stall. ValueError for a bad owner, step or directory;
    ReplicaRefusedError when the peer declines (over its byte budget, older than what it keeps,
    its volume full); ReplicationError for anything else, including a snapshot file that vanished
    or changed while being sent.
    """
    check_owner(owner)
    check_step(step)
    if not os.path.isdir(directory):
        raise ValueError(f"snapshot directory {directory!r} does not exist or is not a directory")
    files = list_snapshot_files(directory)
    total = sum(entry.size for entry in files)
    bucket = None
    chunk_bytes = MAX_DATA_BYTES
    if rate_bytes_per_s is not None:
        bucket = TokenBucket(rate_bytes_per_s)
        # Frames of at most a burst, so a throttled stream is smooth rather than 4 MiB at a time.
        chunk_bytes = int(min(MAX_DATA_BYTES, max(_MIN_THROTTLED_CHUNK_BYTES, bucket.burst_bytes)))
    checksum = default_checksum()
    what = f"push of {owner} step {step} ({len(files)} files, {total} bytes)"
    with _session(address, token, timeout_s, what) as channel:
        channel.send_control(
            {
                "op": "push",
                "owner": owner,
                "step": step,
                "checksum": checksum,
                "files": [{"path": entry.path, "size": entry.size} for entry in files],
            }
        )
        _answer(channel, address, what)
        try:
            checksums = send_files(
                channel,
                files,
                opener=lambda entry: open(os.path.join(directory, entry.path), "rb", buffering=0),  # noqa: SIM115
                checksum=checksum,
                bucket=bucket,
                chunk_bytes=chunk_bytes,
                peer_answered=lambda: bool(select.select([channel.sock], [], [], 0)[0]),
            )
        except LocalReadError as error:
            raise ReplicationError(f"{what}: {error}", address=address) from None
        except (PeerAnswered, OSError) as stopped:
            # The peer refused part way (e.g. its volume is full): its answer says why.
            try:
                _answer(channel, address, what)
            except (ProtocolError, OSError):
                if isinstance(stopped, OSError):
                    raise stopped from None
                raise
            raise ReplicationError(
                f"{what}: the peer answered before the end", address=address
            ) from None
        channel.send_control({"op": "commit", "checksums": checksums})
        _answer(channel, address, what)
    return total


def list_snapshots(
    address: Address, token: bytes, *, owner: str, timeout_s: float = 10.0
) -> list[int]:
    """The steps of ``owner`` the peer holds complete, oldest first."""
    check_owner(owner)
    what = f"listing the replicas of {owner}"
    with _session(address, token, timeout_s, what) as channel:
        channel.send_control({"op": "list", "owner": owner})
        steps = _answer(channel, address, what).get("steps")
    if not isinstance(steps, list) or not all(isinstance(step, int) for step in steps):
        raise ReplicationError(f"{what}: the answer is not a list of steps", address=address)
    return sorted(steps)


def fetch_snapshot(
    address: Address,
    token: bytes,
    *,
    owner: str,
    step: int,
    dest: str,
    timeout_s: float = 60.0,
) -> int:
    """Copy the peer's replica of ``owner``'s ``step`` to the new directory ``dest``; the bytes.

    ``dest`` must not exist; it appears (in one rename) only after every file's size and checksum
    matched the peer's record, so a failed or killed fetch leaves nothing at ``dest``.
    ReplicaRefusedError when the peer has no such step; ReplicationError for anything else
    (including a full volume here); FileExistsError when ``dest`` exists.
    """
    check_owner(owner)
    check_step(step)
    dest = os.path.abspath(dest)
    if os.path.lexists(dest):
        raise FileExistsError(f"fetch destination {dest} already exists; fetch into a new path")
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_fetches(parent, name)
    what = f"fetch of {owner} step {step}"
    staged = tempfile.mkdtemp(dir=parent, prefix=f".{name}.fetch-{os.getpid()}-")
    try:
        with _session(address, token, timeout_s, what) as channel:
            channel.send_control({"op": "fetch", "owner": owner, "step": step})
            reply = _answer(channel, address, what)
            try:
                files = check_file_list(
                    [{"path": f["path"], "size": f["size"]} for f in reply["files"]]
                )
                expected = [str(f["checksum"]) for f in reply["files"]]
                checksum = str(reply["checksum"])
            except (KeyError, TypeError, ValueError) as error:
                raise ReplicationError(
                    f"{what}: malformed file list: {error}", address=address
                ) from None
            try:
                received = receive_files(channel, staged, files, checksum=checksum)
            except LocalWriteError as error:
                raise ReplicationError(
                    f"{what}: writing it here failed (is {parent} full?): {error}", address=address
                ) from None
            end = channel.receive_control()
            if end.get("op") != "end":
                raise ReplicationError(
                    f"{what}: the stream did not end as expected", address=address
                )
        for entry, theirs, ours in zip(files, expected, received, strict=True):
            if theirs != ours:
                raise ReplicationError(
                    f"{what}: file {entry.path!r}: checksum mismatch (peer's record {theirs}, "
                    f"received {ours}); the peer's copy is damaged, restore from another tier",
                    address=address,
                )
        commit_directory(staged, dest)
        staged = None
    finally:
        if staged is not None:
            remove_tree(staged)
    return sum(entry.size for entry in files)


def _remove_abandoned_fetches(parent: str, name: str) -> None:
    """Remove temporary directories of earlier fetches to ``name`` whose process is gone."""
    prefix = f".{name}.fetch-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            remove_tree(os.path.join(parent, entry))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
