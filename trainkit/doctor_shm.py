"""The doctor's /dev/shm section: how much pod memory the memory checkpoint tier can use.

It reads the filesystem's size and free space only; it never writes there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

__all__ = ["SMALL_SHM_BYTES", "format_shm_section", "shm_section"]

#: Docker's and containerd's default /dev/shm: too small for any model's memory snapshots.
SMALL_SHM_BYTES = 64 << 20


def shm_section(root: str = "/") -> dict[str, object]:
    """Size and free bytes of ``<root>/dev/shm``, and a problem line when it is the small default."""
    path = os.path.join(root, "dev", "shm")
    try:
        usage = shutil.disk_usage(path)
    except OSError as error:
        return {"path": path, "available": False, "reason": f"{type(error).__name__}: {error}"}
    section: dict[str, object] = {
        "path": path,
        "available": True,
        "total_bytes": usage.total,
        "free_bytes": usage.free,
    }
    if usage.total <= SMALL_SHM_BYTES:
        section["problem"] = (
            f"{path} holds only {usage.total >> 20} MiB (the container default); memory checkpoints "
            "(memory_interval_steps) need state bytes x local ranks x (memory_keep + 1), twice that "
            "with peer replicas: mount an emptyDir with medium: Memory at /dev/shm with a sizeLimit"
        )
    return section


def format_shm_section(section: Mapping[str, object]) -> str:
    if not section.get("available"):
        return f"== /dev/shm\n  unavailable: {section.get('reason')}"
    total = int(section["total_bytes"])  # type: ignore[call-overload]
    free = int(section["free_bytes"])  # type: ignore[call-overload]
    lines = [
        "== /dev/shm (memory checkpoints)",
        f"  {section['path']}: {total / (1 << 30):.2f} GiB, {free / (1 << 30):.2f} GiB free",
    ]
    if section.get("problem"):
        lines.append(f"WARN    {section['problem']}")
    return "\n".join(lines)
