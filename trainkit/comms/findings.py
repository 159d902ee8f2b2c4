"""What the comms checks produce: findings about the pod and settings they propose.

Plain frozen values shared by the profiles, the RDMA selection, the user-setting checks and the
plan; nothing here reads the pod or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Finding", "Proposal", "format_bytes"]


@dataclass(frozen=True)
class Finding:
    severity: str  # "error", "warning" or "info"
    code: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Proposal:
    """A variable a profile or the RDMA selection wants set, and why (the plan decides provenance)."""

    name: str
    value: str
    reason: str


def format_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:g} {unit}"
    return f"{num_bytes} B"
