"""Streaming a snapshot's files through a Channel: chunked, checksummed, never a whole file in memory.

The socket and the file are read and written in order by the calling thread, while a few worker
threads compute and check the frames' MACs (hashlib releases the GIL), so a transfer is not held
to one core's HMAC-SHA256 speed. The receiver writes only bytes whose frame MAC checked out and
refuses a file that grows past its announced size.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from trainkit.checkpoint.peer.layout import FileEntry
from trainkit.checkpoint.peer.protocol import (
    DATA,
    MAX_DATA_BYTES,
    Channel,
    ProtocolError,
    new_checksum,
)
from trainkit.checkpoint.peer.throttle import TokenBucket

__all__ = [
    "LocalReadError",
    "LocalWriteError",
    "PeerAnswered",
    "default_hash_threads",
    "receive_files",
    "send_files",
]


class LocalReadError(Exception):
    """Reading a file to send failed on this side: it vanished or changed while being sent."""


class LocalWriteError(Exception):
    """Writing a received file failed on this side (a full or read-only volume), not the peer."""


class PeerAnswered(Exception):
    """The receiver sent its answer while we were still sending: it refused part way."""


def default_hash_threads() -> int:
    """Worker threads for MACs: up to 4, fewer on small machines (the agent shares the pod)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class _Pipeline:
    """Frames in flight: each holds one of ``depth`` reused buffers until its MAC work is done."""

    def __init__(self, num_threads: int, buffer_bytes: int) -> None:
        self.pool = ThreadPoolExecutor(num_threads, thread_name_prefix="replica-mac")
        depth = num_threads + 2
        self.free = [memoryview(bytearray(buffer_bytes)) for _ in range(depth)]
        self.pending: collections.deque[tuple[Future[Any], memoryview, Callable[[Any], None]]] = (
            collections.deque()
        )

    def buffer(self) -> memoryview:
        if not self.free:
            self.finish_oldest()
        return self.free.pop()

    def submit(
        self, buffer: memoryview, work: Callable[[], Any], then: Callable[[Any], None]
    ) -> None:
        self.pending.append((self.pool.submit(work), buffer, then))

    def finish_oldest(self) -> None:
        future, buffer, then = self.pending.popleft()
        then(future.result())
        self.free.append(buffer)

    def drain(self) -> None:
        while self.pending:
            self.finish_oldest()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def send_files(
    channel: Channel,
    files: Sequence[FileEntry],
    *,
    opener: Callable[[FileEntry], BinaryIO],
    checksum: str,
    bucket: TokenBucket | None = None,
    chunk_bytes: int = MAX_DATA_BYTES,
    num_threads: int | None = None,
    peer_answered: Callable[[], bool] = lambda: False,
) -> list[str]:
    """Send each file's bytes as data frames, in order; their checksums (hex).

    ``opener`` gives an unbuffered binary file for an entry; it is closed once sent.
    ``peer_answered`` is asked before each frame; when it says yes, PeerAnswered stops the send.
    LocalReadError when a file cannot be read or is not the size announced (it changed).
    """
    chunk_bytes = min(chunk_bytes, MAX_DATA_BYTES)
    pipeline = _Pipeline(num_threads or default_hash_threads(), chunk_bytes)
    checksums = []
    try:
        for entry in files:
            running = new_checksum(checksum)
            try:
                file = opener(entry)
            except OSError as error:
                raise LocalReadError(f"opening {entry.path!r}: {error}") from error
            path = getattr(file, "name", entry.path)
            with file:
                left = entry.size
                while left:
                    if peer_answered():
                        raise PeerAnswered()
                    buffer = pipeline.buffer()
                    try:
                        count = file.readinto(buffer[: min(left, chunk_bytes)])
                    except OSError as error:
                        raise LocalReadError(f"reading {path}: {error}") from error
                    if not count:
                        raise LocalReadError(
                            f"snapshot file {path} ended {left} bytes before its announced "
                            f"{entry.size} bytes: it changed while being replicated"
                        )
                    chunk = buffer[:count]
                    running.update(chunk)
                    if bucket is not None:
                        bucket.consume(count)
                    sequence = channel.next_send_sequence()
                    pipeline.submit(
                        buffer,
                        lambda chunk=chunk, sequence=sequence: channel.seal(DATA, sequence, chunk),
                        lambda sealed: channel.send_sealed(*sealed),
                    )
                    left -= count
                if file.read(1):
                    raise LocalReadError(
                        f"snapshot file {path} grew past {entry.size} bytes while being replicated"
                    )
            checksums.append(running.hexdigest())
        pipeline.drain()
    finally:
        pipeline.close()
    return checksums


def receive_files(
    channel: Channel,
    directory: str,
    files: Sequence[FileEntry],
    *,
    checksum: str,
    num_threads: int | None = None,
) -> list[str]:
    """Receive each file's data frames into ``directory`` (which must be new and private).

    Returns the checksums of the bytes received (hex); the caller compares them with the sender's
    before anything becomes visible. ProtocolError names the file a frame did not fit.
    """
    pipeline = _Pipeline(num_threads or default_hash_threads(), MAX_DATA_BYTES)
    checksums = []
    descriptor = None
    try:
        for entry in files:
            path = os.path.join(directory, entry.path)
            running = new_checksum(checksum)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                # O_EXCL | O_NOFOLLOW: the directory is ours and new, so nothing may exist yet.
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                descriptor = os.open(path, flags, 0o600)
            except OSError as error:
                raise LocalWriteError(f"creating {path}: {error}") from error
            offset = 0
            try:
                while offset < entry.size:
                    buffer = pipeline.buffer()
                    frame = channel.read_unverified(DATA, entry.size - offset, buffer)
                    if not frame[2]:
                        raise ProtocolError("an empty data frame")
                    running.update(frame[2])
                    pipeline.submit(
                        buffer,
                        lambda frame=frame, at=offset, fd=descriptor: _verify_and_write(
                            channel, frame, fd, at
                        ),
                        lambda _: None,
                    )
                    offset += len(frame[2])
                pipeline.drain()
            except ProtocolError as error:  # the same class: a failed MAC stays one
                raise type(error)(
                    f"file {entry.path!r} ({entry.size} bytes announced, {entry.size - offset} "
                    f"left): {error}"
                ) from None
            os.close(descriptor)
            descriptor = None
            checksums.append(running.hexdigest())
    finally:
        pipeline.close()  # before closing the file its workers may still write
        if descriptor is not None:
            os.close(descriptor)
    return checksums


def _verify_and_write(
    channel: Channel, frame: tuple[int, bytes, memoryview, bytes], descriptor: int, offset: int
) -> None:
    channel.verify(*frame)
    data = frame[2]
    try:
        while data:
            written = os.pwrite(descriptor, data, offset)
            data, offset = data[written:], offset + written
    except OSError as error:
        raise LocalWriteError(f"writing {len(data)} bytes at offset {offset}: {error}") from error
