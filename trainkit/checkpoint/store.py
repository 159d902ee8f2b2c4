"""Compatibility names: the checkpoint root (``root.CheckpointRoot``, once ``Store``) and block
I/O (``blocks``) used to live here. New code imports those modules.
"""

from __future__ import annotations

from trainkit.checkpoint.blocks import (
    BLOCK_BYTES,
    CHECKSUMS,
    BlockWriter,
    BufferPool,
    CancelledError,
    FileInfo,
    checksum_function,
    default_checksum,
    read_file_ranges,
    verify_file,
    write_file,
)
from trainkit.checkpoint.root import CheckpointRoot

#: The old name; it collided with ``torch.distributed.Store``.
Store = CheckpointRoot

__all__ = [
    "BLOCK_BYTES",
    "CHECKSUMS",
    "BlockWriter",
    "BufferPool",
    "CancelledError",
    "CheckpointRoot",
    "FileInfo",
    "Store",
    "checksum_function",
    "default_checksum",
    "read_file_ranges",
    "verify_file",
    "write_file",
]
