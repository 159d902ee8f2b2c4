"""The checkpoint root: one directory or bucket prefix on any fsspec filesystem.

Listing, atomic small writes, fsync of directories, deletion; local paths get fsync and direct
I/O. It knows nothing of steps or commits (see ``commit``) or of block checksums (see ``blocks``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from trainkit.checkpoint.blocks import BLOCK_BYTES, BlockWriter, BufferPool, with_path
from trainkit.checkpoint.errors import CheckpointNotWritableError

__all__ = ["CheckpointRoot"]


class CheckpointRoot:
    """A checkpoint root on any fsspec filesystem; local paths get fsync and direct I/O."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = root
        self.fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = path.rstrip("/") or "/"

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def display(self, path: str) -> str:
        """A path as the user would write it (with the URL scheme for object stores)."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def list_names(self, path: str | None = None) -> list[str]:
        """Names directly under ``path`` (default the root); empty when it does not exist."""
        path = path or self.root
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries} - {""})

    def exists(self, path: str) -> bool:
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return bool(self.fs.exists(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def check_writable(self) -> None:
        """Create the root and write, then delete, a probe file; raise a clear error when that fails."""
        probe = self.join(f".trainkit-write-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            self.makedirs(self.root)
            self.write_atomic(probe, b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as error:
            raise CheckpointNotWritableError(
                f"checkpoint root {self.display(self.root)} is not writable ({type(error).__name__}: "
                f"{error}); point CheckpointManager at a writable directory or bucket (a mounted PVC, "
                "s3://bucket/prefix with write access)"
            ) from error

    def write_atomic(self, path: str, data: bytes) -> None:
        """Make ``data`` visible at ``path`` all at once: temp + fsync + rename locally, one PUT remotely."""
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        temporary = f"{path}.tmp-{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise with_path(error, path) from None
        finally:
            os.close(fd)
        os.replace(temporary, path)
        self.fsync_dir(os.path.dirname(path))

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries durable (POSIX); object stores need nothing."""
        if not self.is_local:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def open_read(self, path: str) -> Any:
        if self.is_local:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return handle
        return self.fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="none")

    def remove_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def open_writer(
        self, path: str, pool: BufferPool, cancel: threading.Event | None = None
    ) -> BlockWriter:
        return BlockWriter(self, path, pool, cancel)
