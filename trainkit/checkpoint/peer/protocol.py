"""The replica channel's wire format: authenticated frames over one TCP connection.

Each side opens with a 32-byte random nonce; the session key is HMAC-SHA256(job token, both nonces),
and every later frame carries HMAC-SHA256(session key, direction, sequence number, frame), so a
recorded session replayed to a new connection fails. Frames are a small JSON control object or raw
file bytes; nothing is ever unpickled or evaluated, and nothing is parsed before its MAC checks out.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

from trainkit.checkpoint.errors import CheckpointError
from trainkit.k8s.signed_state import JOB_TOKEN_VARIABLE

__all__ = [
    "CHECKSUMS",
    "MAX_CONTROL_BYTES",
    "MAX_DATA_BYTES",
    "AuthenticationError",
    "Channel",
    "ProtocolError",
    "ReplicaRefusedError",
    "ReplicationError",
    "default_checksum",
    "new_checksum",
]

MAGIC = b"TKR1"
#: magic, frame kind, body length; the MAC (32 bytes) follows the body of every frame but HELLO.
PREFIX = struct.Struct("!4sBI")
#: DENIED has no body and no MAC: "your frames failed my authentication", sent before closing.
HELLO, CONTROL, DATA, DENIED = 0, 1, 2, 3
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
#: A control frame (JSON) may not be longer: a snapshot's file list fits with room to spare.
MAX_CONTROL_BYTES = 1 << 20
#: Raw bytes per data frame; the receiver holds one frame in a reused buffer before writing it.
MAX_DATA_BYTES = 4 << 20
_KEY_LABEL = b"trainkit replica channel v1\0"


class ReplicationError(CheckpointError, RuntimeError):
    """Replication to or from a peer failed; the message names the peer address and what failed.

    A ``CheckpointError`` too, so it crosses process boundaries like every checkpoint error.
    """

    def __init__(self, message: str, address: tuple[str, int] | None = None) -> None:
        where = f"replica peer {address[0]}:{address[1]}: " if address else ""
        super().__init__(where + message)
        self.address = address


class ReplicaRefusedError(ReplicationError):
    """The peer answered and refused the request (no such step, over its byte budget, bad name)."""


class ProtocolError(Exception):
    """A frame broke the protocol (bad magic, failed MAC, oversize, truncated); the reason is logged."""


class AuthenticationError(ProtocolError):
    """A frame's MAC did not check out: another token, or altered or replayed bytes."""


# -- checksums of file contents -------------------------------------------------------------------


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Any) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def _xxh3_64() -> Any:
    import xxhash

    return xxhash.xxh3_64()


#: Per-file checksums by name: xxh3_64 when the xxhash package is installed, else CRC32.
CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_64": _xxh3_64, "crc32": _Crc32}


def default_checksum() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def new_checksum(name: str) -> Any:
    """A fresh running checksum (``update``, ``hexdigest``); ProtocolError for an unknown name."""
    if name == "xxh3_64" and default_checksum() != "xxh3_64":
        raise ProtocolError("the peer uses xxh3_64 checksums and the xxhash package is missing")
    if name not in CHECKSUMS:
        raise ProtocolError(f"unknown checksum {name!r}; expected one of {sorted(CHECKSUMS)}")
    return CHECKSUMS[name]()


# -- frames ---------------------------------------------------------------------------------------


def _send_all(sock: socket.socket, buffers: list[Any]) -> None:
    """``sendmsg`` until every buffer is out: one syscall per frame, no copy into one bytes object."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class Channel:
    """One side of an authenticated connection. ``role`` is ``"client"`` or ``"server"``.

    ``handshake(token)`` must run first; after it, ``send_control``/``send_data`` and
    ``receive_control``/``receive_data`` exchange authenticated frames. Every failure of the peer's
    frames raises ProtocolError with the reason; socket errors and timeouts propagate as OSError.
    """

    def __init__(self, sock: socket.socket, *, role: str) -> None:
        assert role in ("client", "server")
        self.sock = sock
        self._own_label = role[0].encode()
        self._peer_label = b"s" if role == "client" else b"c"
        self._role = role
        self._mac_base: Any = None
        self._copy_lock = threading.Lock()
        self._sent = 0
        self._received = 0
        self._prefix = bytearray(PREFIX.size)
        self._mac = bytearray(MAC_BYTES)

    def handshake(self, token: bytes) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        self.sock.sendall(PREFIX.pack(MAGIC, HELLO, NONCE_BYTES) + nonce)
        kind, length = self._read_prefix()
        if kind != HELLO or length != NONCE_BYTES:
            raise ProtocolError(
                f"expected a hello of {NONCE_BYTES} bytes, got kind {kind} ({length})"
            )
        peer_nonce = self._read_exact(bytearray(NONCE_BYTES))
        server_nonce, client_nonce = (
            (nonce, peer_nonce) if self._role == "server" else (peer_nonce, nonce)
        )
        key = hmac.new(token, _KEY_LABEL + server_nonce + client_nonce, hashlib.sha256).digest()
        self._mac_base = hmac.new(key, digestmod=hashlib.sha256)

    def _frame_mac(self, label: bytes, sequence: int, prefix: bytes, body: Any) -> bytes:
        with self._copy_lock:  # the one shared object; each frame hashes its own copy
            mac = self._mac_base.copy()
        mac.update(label + sequence.to_bytes(8, "big") + prefix)
        mac.update(body)
        return mac.digest()

    def _send(self, kind: int, body: Any) -> None:
        self.send_sealed(*self.seal(kind, self.next_send_sequence(), body))

    def next_send_sequence(self) -> int:
        """Number the next frame to send; frames must then be sent in this order."""
        self._sent += 1
        return self._sent - 1

    def seal(self, kind: int, sequence: int, body: Any) -> tuple[bytes, Any, bytes]:
        """``(prefix, body, mac)`` of frame number ``sequence``; safe to call from other threads."""
        prefix = PREFIX.pack(MAGIC, kind, len(body))
        return prefix, body, self._frame_mac(self._own_label, sequence, prefix, body)

    def send_sealed(self, prefix: bytes, body: Any, mac: bytes) -> None:
        _send_all(self.sock, [prefix, body, mac])

    def send_control(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        if len(body) > MAX_CONTROL_BYTES:
            raise ValueError(
                f"replica control message of {len(body)} bytes is over {MAX_CONTROL_BYTES}; "
                "a snapshot of fewer, larger files fits"
            )
        self._send(CONTROL, body)

    def send_denied(self) -> None:
        """Tell the peer its frames failed authentication (best effort: it may be gone)."""
        with contextlib.suppress(OSError):
            self.sock.sendall(PREFIX.pack(MAGIC, DENIED, 0))

    def send_data(self, chunk: memoryview) -> None:
        assert 0 < len(chunk) <= MAX_DATA_BYTES
        self._send(DATA, chunk)

    def _read_exact(self, buffer: bytearray | memoryview) -> Any:
        view = memoryview(buffer)
        got = 0
        while got < len(view):
            count = self.sock.recv_into(view[got:])
            if count == 0:
                raise ProtocolError(
                    f"connection closed after {got} of {len(view)} bytes of a frame"
                )
            got += count
        return buffer

    def _read_prefix(self) -> tuple[int, int]:
        self._read_exact(self._prefix)
        magic, kind, length = PREFIX.unpack(self._prefix)
        if magic != MAGIC:
            raise ProtocolError(
                f"not a trainkit replica frame (starts with {bytes(self._prefix[:4])!r})"
            )
        return kind, length

    def read_unverified(
        self, expected: int, limit: int, buffer: memoryview | None = None
    ) -> tuple[int, bytes, memoryview, bytes]:
        """The next frame of kind ``expected`` (at most ``limit`` bytes) as ``(sequence, prefix,
        body, mac)``; nothing in it may be used before ``verify`` accepted it."""
        kind, length = self._read_prefix()
        if kind == DENIED:
            raise AuthenticationError(
                f"the peer refused this connection: our frames failed its authentication; give "
                f"every pod of the job the same {JOB_TOKEN_VARIABLE}"
            )
        if kind != expected:
            raise ProtocolError(f"expected a frame of kind {expected}, got kind {kind}")
        if length > limit:
            raise ProtocolError(f"frame of {length} bytes where at most {limit} were expected")
        prefix = bytes(self._prefix)
        body = buffer[:length] if buffer is not None else memoryview(bytearray(length))
        self._read_exact(body)
        mac = bytes(self._read_exact(self._mac))
        self._received += 1
        return self._received - 1, prefix, body, mac

    def verify(self, sequence: int, prefix: bytes, body: Any, mac: bytes) -> None:
        """AuthenticationError unless ``mac`` is the peer's MAC of frame number ``sequence``;
        safe to call from other threads."""
        expected = self._frame_mac(self._peer_label, sequence, prefix, body)
        if not hmac.compare_digest(expected, mac):
            raise AuthenticationError(
                "frame failed authentication (HMAC-SHA256 under the job token): the peer has a "
                f"different {JOB_TOKEN_VARIABLE}, or the stream was altered or replayed"
            )

    def _read_frame(
        self, expected: int, limit: int, buffer: memoryview | None = None
    ) -> memoryview:
        """One frame of kind ``expected`` and at most ``limit`` bytes, its MAC checked; the body."""
        sequence, prefix, body, mac = self.read_unverified(expected, limit, buffer)
        self.verify(sequence, prefix, body, mac)
        return body

    def receive_control(self) -> dict[str, Any]:
        """The next frame, which must be an authenticated JSON object."""
        body = self._read_frame(CONTROL, MAX_CONTROL_BYTES)
        try:
            message = json.loads(bytes(body))
        except (UnicodeDecodeError, ValueError) as error:
            raise ProtocolError(f"control frame is not JSON: {error}") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"control frame is a JSON {type(message).__name__}, not an object")
        return message

    def receive_data(self, buffer: memoryview, limit: int) -> memoryview:
        """The next frame's raw bytes (at most ``limit``), authenticated, as a view into ``buffer``."""
        return self._read_frame(DATA, min(limit, len(buffer)), buffer)
