"""Errors raised by shards: one small tree, every message names the URL, shard or column at fault.

User mistakes are ``ValueError`` subclasses so callers can catch them broadly; nothing here is ever
raised for an internal invariant (those are ``assert``).
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatchError",
    "ManifestError",
    "SchemaDriftError",
    "ShardsError",
    "UnsafePathError",
]


class ShardsError(ValueError):
    """Base class of every error a user can cause with a dataset, its files or its arguments."""


class ManifestError(ShardsError):
    """The manifest is missing, unreadable, or inconsistent with the files beside it."""


class ChecksumMismatchError(ShardsError):
    """A shard's bytes differ from what the manifest recorded (flipped, truncated or replaced)."""


class SchemaDriftError(ShardsError):
    """A batch or a shard has a schema other than the dataset's."""


class UnsafePathError(ShardsError):
    """A shard path in a manifest would escape the dataset root."""
