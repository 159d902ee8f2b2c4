"""Streaming a snapshot's files through a Channel: chunked, checksummed, never a whole file in memory.

Both directions use one reused buffer per transfer; the receiver writes only bytes whose frame MAC
already checked out, and refuses a file that grows past its announced size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import BinaryIO

from trainkit.checkpoint.peer.layout import FileEntry
from trainkit.checkpoint.peer.protocol import MAX_DATA_BYTES, Channel, ProtocolError, new_checksum
from trainkit.checkpoint.peer.throttle import TokenBucket

__all__ = ["receive_files", "send_files"]


def send_files(
    channel: Channel,
    files: Sequence[FileEntry],
    *,
    opener: Callable[[FileEntry], BinaryIO],
    checksum: str,
    bucket: TokenBucket | None = None,
    chunk_bytes: int = MAX_DATA_BYTES,
) -> list[str]:
    """Send each file's bytes as data frames, in order; their checksums (hex).

    ``opener`` gives an unbuffered binary file for an entry; it is closed once sent.
    ValueError when a file is not the size announced (it changed while being sent).
    """
    buffer = memoryview(bytearray(min(chunk_bytes, MAX_DATA_BYTES)))
    checksums = []
    for entry in files:
        running = new_checksum(checksum)
        file = opener(entry)
        path = getattr(file, "name", entry.path)
        with file:
            left = entry.size
            while left:
                count = file.readinto(buffer[: min(left, len(buffer))])
                if not count:
                    raise ValueError(
                        f"snapshot file {path} ended {left} bytes before its announced "
                        f"{entry.size} bytes: it changed while being replicated"
                    )
                chunk = buffer[:count]
                running.update(chunk)
                if bucket is not None:
                    bucket.consume(count)
                channel.send_data(chunk)
                left -= count
            if file.read(1):
                raise ValueError(
                    f"snapshot file {path} grew past {entry.size} bytes while being replicated"
                )
        checksums.append(running.hexdigest())
    return checksums


def receive_files(
    channel: Channel, directory: str, files: Sequence[FileEntry], *, checksum: str
) -> list[str]:
    """Receive each file's data frames into ``directory`` (which must be new and private).

    Returns the checksums of the bytes written (hex); the caller compares them with the sender's
    before anything becomes visible. ProtocolError names the file a frame did not fit.
    """
    buffer = memoryview(bytearray(MAX_DATA_BYTES))
    checksums = []
    for entry in files:
        path = os.path.join(directory, entry.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        running = new_checksum(checksum)
        # O_EXCL | O_NOFOLLOW: the directory is ours and new, so nothing may exist here yet.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            left = entry.size
            while left:
                try:
                    chunk = channel.receive_data(buffer, left)
                except ProtocolError as error:  # the same class: a failed MAC stays one
                    raise type(error)(
                        f"file {entry.path!r} ({entry.size} bytes announced, {left} left): {error}"
                    ) from None
                if not chunk:
                    raise ProtocolError(f"file {entry.path!r}: an empty data frame")
                running.update(chunk)
                _write_all(descriptor, chunk)
                left -= len(chunk)
        finally:
            os.close(descriptor)
        checksums.append(running.hexdigest())
    return checksums


def _write_all(descriptor: int, data: memoryview) -> None:
    while data:
        data = data[os.write(descriptor, data) :]
