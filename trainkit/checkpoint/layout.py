"""How a training state maps onto a checkpoint: which entries go through DCP (global), which are
kept per rank, and whether a checkpoint fits the state. Pure bookkeeping: no I/O, no collectives.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from trainkit.checkpoint.errors import CheckpointMismatchError

__all__ = [
    "check_keys",
    "is_stateful",
    "model_of",
    "rank_file_name",
    "serialize_rank_state",
    "split_state",
]


def rank_file_name(rank: int) -> str:
    """The per-rank state file of ``rank`` inside a step directory."""
    return f"rank_{rank:05d}.pt"


def is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def split_state(
    state: Mapping[str, Any], *, per_rank: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(global state for DCP, per-rank entries, modules by name).

    Global: modules and optimizers (as DCP state dicts) and top-level tensors. Per rank (only
    captured when ``per_rank``): ``torch.Generator`` states, ``state_dict()`` of other Stateful
    objects, and plain data as it is (a dataclass object as a dict of its fields).
    """
    import torch
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from trainkit.checkpoint.train_state import capture_plain

    modules = {name: value for name, value in state.items() if isinstance(value, nn.Module)}
    global_state: dict[str, Any] = {}
    entries: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            global_state[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            global_state[name] = get_optimizer_state_dict(model_of(name, value, modules), value)
        elif isinstance(value, torch.Tensor):
            global_state[name] = value
        elif not per_rank:
            continue
        elif isinstance(value, torch.Generator):
            entries[name] = value.get_state()
        elif is_stateful(value):
            entries[name] = value.state_dict()
        else:
            entries[name] = capture_plain(value)
    return global_state, entries, modules


def model_of(name: str, optimizer: Any, modules: dict[str, Any]) -> Any:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if any(id(p) in params for p in module.parameters()):
            return module
    raise ValueError(
        f"state[{name!r}] is an optimizer whose parameters belong to no nn.Module in the state; "
        "add the model to the state dict passed to save/restore (e.g. {'model': model, 'optim': optim})"
    )


def serialize_rank_state(payload: dict[str, Any], step: int) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:
        raise ValueError(
            f"step {step}: per-rank state cannot be saved safely: {str(error).splitlines()[0]}. Keep "
            "non-model entries to tensors, numbers, strings, lists and dicts (their state_dict() too)"
        ) from None
    return data


def check_keys(step: int, global_state: dict[str, Any], metadata: Any, where: str) -> None:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not global_state:
        return
    flat, _ = flatten_state_dict(global_state)
    saved = metadata.state_dict_metadata
    missing = sorted(key for key in flat if key not in saved)
    prefixes = tuple(f"{name}." for name in global_state)
    unexpected = sorted(key for key in saved if key.startswith(prefixes) and key not in flat)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing from the checkpoint: {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected in the checkpoint: {', '.join(unexpected[:8])}"
                + (" ..." if len(unexpected) > 8 else "")
            )
        raise CheckpointMismatchError(
            step,
            f"checkpoint step {step} at {where} does not match the state being restored ("
            f"{'; '.join(parts)}); it was saved from another model - use another root or fix the model",
            missing + unexpected,
        )
    for key, value in flat.items():
        entry = saved[key]
        shape = getattr(value, "shape", None)
        if (
            isinstance(entry, TensorStorageMetadata)
            and shape is not None
            and tuple(entry.size) != tuple(shape)
        ):
            raise CheckpointMismatchError(
                step,
                f"checkpoint step {step} at {where}: key {key!r} has shape {tuple(entry.size)} in the "
                f"checkpoint but {tuple(shape)} in the model; it was saved from another model",
                [key],
            )
