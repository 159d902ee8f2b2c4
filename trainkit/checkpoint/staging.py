"""Host staging for async saves: tensors are copied into buffers allocated once and reused.

Fresh host pages are slow to touch and pinned ones slow to get, so buffers are kept per state key
for the manager's lifetime; the copy is the only work an async save does on the training thread.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["HostStaging"]


class HostStaging:
    """Copies a nested state dict into reusable host tensors (pinned when the source is on CUDA)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], Any] = {}
        self._devices: set[Any] = set()

    def copy(self, tree: Any) -> Any:
        """A copy of ``tree`` whose tensors live in this object's host buffers."""
        import torch

        self._devices = set()
        result = self._copy(tree, ())
        for device in self._devices:
            torch.cuda.current_stream(device).synchronize()  # one wait for all non-blocking copies
        return result

    def _copy(self, value: Any, path: tuple[Any, ...]) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, path)
        if isinstance(value, dict):
            return {key: self._copy(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._copy(item, (*path, index)) for index, item in enumerate(value))
        return copy.deepcopy(value)

    def _copy_tensor(self, tensor: Any, path: tuple[Any, ...]) -> Any:
        import torch
        from torch.distributed.tensor import DTensor

        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            buffer = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
            self._buffers[path] = buffer
        buffer.copy_(local.detach(), non_blocking=local.is_cuda)
        if local.is_cuda:
            self._devices.add(local.device)
        if isinstance(tensor, DTensor):
            return DTensor.from_local(
                buffer,
                tensor.device_mesh,
                tensor.placements,
                run_check=False,
                shape=tensor.shape,
                stride=tensor.stride(),
            )
        return buffer
