"""The replica server: keeps peers' snapshots on this pod and serves them back to a replacement pod.

It runs as threads of the trainkit-run agent, listens only on the address it is given (the pod IP),
and answers only connections whose frames authenticate under the job token. Stored snapshots are
committed-or-invisible: received into ``root/.incoming``, verified, then renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from trainkit.checkpoint.peer.layout import (
    ReplicaRecord,
    check_file_list,
    check_owner,
    check_step,
    commit_directory,
    complete_steps,
    read_record,
    remove_tree,
    step_dir_name,
    write_record,
)
from trainkit.checkpoint.peer.protocol import (
    CHECKSUMS,
    AuthenticationError,
    Channel,
    ProtocolError,
    new_checksum,
)
from trainkit.checkpoint.peer.transfer import (
    LocalReadError,
    LocalWriteError,
    receive_files,
    send_files,
)
from trainkit.k8s.signed_state import MIN_TOKEN_BYTES

__all__ = ["ReplicaServer"]

logger = logging.getLogger("trainkit.checkpoint.peer")

INCOMING_DIR = ".incoming"


class _Refusal(Exception):
    """A well-formed, authenticated request this server declines; the message goes to the sender."""


class ReplicaServer:
    """Stores pushed snapshots as ``root/<owner>/<step:012d>/`` and serves them back.

    ``host``: the only address it binds (the pod IP; loopback in tests). ``port``: 0 picks a free
    one; ``address`` is the bound ``(host, port)`` once ``start()`` returned. ``token``: the job
    token (at least 16 bytes). ``keep``: complete steps kept per owner (default 2); a push older than
    all of them is refused. ``max_bytes``: the most bytes stored at once, in-flight pushes included
    (None: no limit); to make room a push may first drop the owner's steps it would retire anyway.
    ``io_timeout_s``: the time a new connection has to authenticate its request, and then the
    longest any one receive or send may stall before the connection is dropped;
    ``max_connections``: connections served at once (more are closed at once).
    """

    def __init__(
        self,
        root: str,
        *,
        host: str,
        port: int = 0,
        token: bytes,
        keep: int = 2,
        max_bytes: int | None = None,
        io_timeout_s: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        if not isinstance(token, bytes) or len(token) < MIN_TOKEN_BYTES:
            raise ValueError(
                f"replica server token: expected at least {MIN_TOKEN_BYTES} bytes, got "
                f"{len(token) if isinstance(token, bytes) else type(token).__name__}; pass the job "
                "token (token_from_env())"
            )
        if keep < 1:
            raise ValueError(f"replica server keep={keep}: keep at least 1 step per owner")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(
                f"replica server max_bytes={max_bytes}: expected a positive byte count"
            )
        self.root = os.path.abspath(root)
        self.host = host
        self.port = port
        self.keep = keep
        self.max_bytes = max_bytes
        self.io_timeout_s = io_timeout_s
        self.address: tuple[str, int] | None = None
        self._token = token
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stored: dict[tuple[str, int], int] = {}
        self._reserved_bytes = 0
        self._stats = dict.fromkeys(
            ("bytes_received", "bytes_sent", "snapshots_received", "snapshots_served", "refused"), 0
        )
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Clean what a killed server left half-received, index what is stored, and listen."""
        os.makedirs(self.root, exist_ok=True)
        remove_tree(os.path.join(self.root, INCOMING_DIR))
        os.makedirs(os.path.join(self.root, INCOMING_DIR))
        self._index_stored()
        self._listener = socket.create_server((self.host, self.port), backlog=64)
        self.address = self._listener.getsockname()[:2]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"replica-server-{self.address[1]}", daemon=True
        )
        self._accept_thread.start()
        logger.info("replica server listening on %s:%d, root %s", *self.address, self.root)

    def close(self) -> None:
        """Stop listening, drop open connections (their partial pushes are removed) and wait."""
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> ReplicaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what is stored ---------------------------------------------------------------------------
    def steps(self, owner: str) -> list[int]:
        """The complete steps stored for ``owner``, oldest first."""
        return complete_steps(os.path.join(self.root, check_owner(owner)))

    def snapshot_path(self, owner: str, step: int) -> str:
        """Where the snapshot of ``owner`` at ``step`` is (or would be) stored."""
        return os.path.join(self.root, check_owner(owner), step_dir_name(check_step(step)))

    @property
    def stored_bytes(self) -> int:
        with self._lock:
            return sum(self._stored.values())

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: bytes received and sent, snapshots received and served, refused."""
        with self._lock:
            return dict(self._stats)

    def _index_stored(self) -> None:
        self._stored.clear()
        for owner in sorted(os.listdir(self.root)):
            if owner == INCOMING_DIR:
                continue
            try:
                check_owner(owner)
            except ValueError:
                continue
            for step in complete_steps(os.path.join(self.root, owner)):
                path = self.snapshot_path(owner, step)
                try:
                    self._stored[owner, step] = read_record(path).total_bytes
                except ValueError as error:
                    logger.warning("replica server: removing unreadable replica: %s", error)
                    remove_tree(path)
            self._apply_retention(owner)

    def _apply_retention(self, owner: str) -> None:
        """Drop all but the newest ``keep`` steps of ``owner``; call with the lock held (or alone)."""
        for step in self.steps(owner)[: -self.keep]:
            remove_tree(self.snapshot_path(owner, step))
            self._stored.pop((owner, step), None)

    # -- connections ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                connection, peer = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                logger.warning(
                    "replica server %s:%d: refused connection from %s:%d: already serving the "
                    "maximum number of connections",
                    *self.address,  # type: ignore[misc]
                    *peer[:2],
                )
                connection.close()
                continue
            thread = threading.Thread(
                target=self._serve, args=(connection, peer[:2]), name="replica-conn", daemon=True
            )
            with self._lock:
                self._connections.add(connection)
                self._threads.add(thread)
            thread.start()

    def _serve(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        channel = Channel(connection, role="server")
        what = "connection"
        expired = threading.Event()
        try:
            connection.settimeout(self.io_timeout_s)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Until it authenticates, a peer gets io_timeout_s in all (no trickling bytes to hold
            # a connection slot); after that, each receive or send may stall that long.
            watchdog = threading.Timer(self.io_timeout_s, _shut_down, args=(connection, expired))
            watchdog.start()
            try:
                channel.handshake(self._token)
                request = channel.receive_control()
            finally:
                watchdog.cancel()
            operation = request.get("op")
            handlers: dict[Any, Callable[[Channel, dict[str, Any]], str]] = {
                "push": self._push,
                "list": self._list,
                "fetch": self._fetch,
            }
            if operation not in handlers:
                raise ProtocolError(f"unknown request {str(operation)[:40]!r}")
            what = f"{operation} request"
            try:
                done = handlers[operation](channel, request)
            except (_Refusal, ValueError) as refusal:
                self._refused(what, peer, refusal)
                channel.send_control({"ok": False, "error": str(refusal)})
                # Read until the peer hangs up: closing with its bytes unread would reset the
                # connection and could destroy the answer before the peer reads it.
                _drain(connection, self.io_timeout_s)
                return
            logger.info("replica server: %s for %s:%d", done, *peer)
        except LocalReadError as error:
            self._refused(what, peer, f"reading the stored replica failed: {error}")
        except AuthenticationError as error:
            self._refused(what, peer, error)
            channel.send_denied()
        except (ProtocolError, OSError) as error:
            if expired.is_set():
                self._refused(what, peer, f"did not authenticate within {self.io_timeout_s} s")
            elif isinstance(error, ProtocolError):
                self._refused(what, peer, error)
            elif not self._closing.is_set():
                self._refused(what, peer, f"connection failed: {error}")
        finally:
            connection.close()
            self._slots.release()
            with self._lock:
                self._connections.discard(connection)
                self._threads.discard(threading.current_thread())

    def _refused(self, what: str, peer: tuple[str, int], reason: object) -> None:
        with self._lock:
            self._stats["refused"] += 1
        logger.warning(
            "replica server %s:%d: refused %s from %s:%d: %s",
            *self.address,  # type: ignore[misc]
            what,
            *peer,
            reason,
        )

    # -- requests ---------------------------------------------------------------------------------
    def _list(self, channel: Channel, request: dict[str, Any]) -> str:
        owner = check_owner(request.get("owner"))
        steps = self.steps(owner)
        channel.send_control({"ok": True, "steps": steps})
        return f"listed {len(steps)} steps of {owner}"

    def _push(self, channel: Channel, request: dict[str, Any]) -> str:
        owner = check_owner(request.get("owner"))
        step = check_step(request.get("step"))
        checksum = request.get("checksum")
        if checksum not in CHECKSUMS:
            raise _Refusal(
                f"unknown checksum {str(checksum)[:40]!r}; expected one of {sorted(CHECKSUMS)}"
            )
        new_checksum(checksum)  # refuses xxh3_64 when xxhash is missing here
        files = check_file_list(request.get("files"))
        total = sum(entry.size for entry in files)
        self._reserve(owner, step, total)
        staged = None
        try:
            try:
                staged = tempfile.mkdtemp(
                    dir=os.path.join(self.root, INCOMING_DIR),
                    prefix=f"{owner}-{step_dir_name(step)}-",
                )
            except OSError as error:
                raise _Refusal(f"this peer could not store the snapshot: {error}") from None
            channel.send_control({"ok": True})
            try:
                received = receive_files(channel, staged, files, checksum=checksum)
            except LocalWriteError as error:
                raise _Refusal(f"this peer could not store the snapshot: {error}") from None
            self._count("bytes_received", total)
            commit = channel.receive_control()
            sent = commit.get("checksums")
            if (
                commit.get("op") != "commit"
                or not isinstance(sent, list)
                or len(sent) != len(files)
            ):
                raise ProtocolError("expected a commit with one checksum per file")
            for entry, ours, theirs in zip(files, received, sent, strict=True):
                if ours != theirs:
                    raise _Refusal(
                        f"file {entry.path!r}: checksum mismatch (sender {str(theirs)[:32]!r}, "
                        f"received {ours!r}); push the step again"
                    )
            record = ReplicaRecord(owner, step, checksum, tuple(files), tuple(received))
            with self._lock:
                try:
                    write_record(staged, record)
                    commit_directory(staged, self.snapshot_path(owner, step))
                except OSError as error:
                    raise _Refusal(f"this peer could not store the snapshot: {error}") from None
                staged = None
                self._reserved_bytes -= total
                self._stored[owner, step] = total
                self._apply_retention(owner)
                self._stats["snapshots_received"] += 1
        finally:
            if staged is not None:
                remove_tree(staged)
                with self._lock:
                    self._reserved_bytes -= total
        channel.send_control({"ok": True, "bytes": total})
        return f"stored {owner} step {step} ({total} bytes)"

    def _reserve(self, owner: str, step: int, total: int) -> None:
        """Account ``total`` bytes for an incoming push, or refuse it (stale step, over budget)."""
        with self._lock:
            held = self.steps(owner)
            newer = [other for other in held if other > step]
            if len(newer) >= self.keep:
                raise _Refusal(
                    f"step {step} of {owner} is older than the {self.keep} newer steps this peer "
                    f"keeps ({newer[-self.keep :]}); nothing to replicate"
                )
            if self.max_bytes is not None:
                # Steps this push retires on commit anyway may go first, oldest first.
                survivors = sorted({*held, step})[-self.keep :]
                retiring = [other for other in held if other not in survivors]
                used = sum(self._stored.values()) + self._reserved_bytes
                while used + total > self.max_bytes and retiring:
                    old = retiring.pop(0)
                    remove_tree(self.snapshot_path(owner, old))
                    used -= self._stored.pop((owner, old), 0)
                if used + total > self.max_bytes:
                    raise _Refusal(
                        f"snapshot of {owner} step {step} needs {total} bytes and this peer holds "
                        f"{used} of its max_bytes={self.max_bytes} (pushes in flight included); "
                        "give the replica server more memory (or a larger /dev/shm) or keep fewer "
                        "steps"
                    )
            self._reserved_bytes += total

    def _fetch(self, channel: Channel, request: dict[str, Any]) -> str:
        owner = check_owner(request.get("owner"))
        step = check_step(request.get("step"))
        opened: dict[str, BinaryIO] = {}
        try:
            with self._lock:
                path = self.snapshot_path(owner, step)
                if step not in self.steps(owner):
                    raise _Refusal(
                        f"no complete replica of {owner} step {step} here (have {self.steps(owner)})"
                    )
                record = read_record(path)
                # Open everything now: retention may remove the directory while it streams.
                for entry in record.files:
                    opened[entry.path] = open(os.path.join(path, entry.path), "rb", buffering=0)  # noqa: SIM115
            channel.send_control(
                {"ok": True, "checksum": record.checksum, "files": record.files_json()}
            )
            checksums = send_files(
                channel,
                record.files,
                opener=lambda entry: opened[entry.path],
                checksum=record.checksum,
            )
            if list(checksums) != list(record.checksums):
                # Damaged at rest: the receiver's comparison with the record will refuse it too.
                logger.warning(
                    "replica server: stored %s step %d no longer matches its record", owner, step
                )
            channel.send_control({"op": "end", "bytes": record.total_bytes})
        finally:
            for file in opened.values():
                file.close()
        self._count("bytes_sent", record.total_bytes)
        self._count("snapshots_served", 1)
        return f"served {owner} step {step} ({record.total_bytes} bytes)"

    def _count(self, name: str, amount: int) -> None:
        with self._lock:
            self._stats[name] += amount


def _shut_down(connection: socket.socket, expired: threading.Event) -> None:
    expired.set()
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _drain(connection: socket.socket, timeout_s: float) -> None:
    """Discard what the peer still sends until it closes (or stalls for ``timeout_s``)."""
    connection.settimeout(timeout_s)
    with contextlib.suppress(OSError):
        while connection.recv(1 << 16):
            pass
