"""Plain training-loop values in a checkpointed state: the ``TrainState`` attribute holder, and how
restore puts saved values back so the caller's own objects see them. No I/O, no collectives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

__all__ = ["TrainState", "capture_plain", "restore_plain"]


class TrainState:
    """The loop's scalars as attributes, saved per rank and restored on the same object.

    ``train = TrainState(iter_num=0, best_val_loss=1e9)``; put it in the state
    (``{"model": model, "train": train}``) and after ``restore`` read ``train.iter_num``. Values
    must be plain data or tensors (``torch.load(weights_only=True)`` reads them back). Attributes
    that the checkpoint does not have keep their current value, so new ones can be added later.
    """

    def __init__(self, **values: Any) -> None:
        vars(self).update(values)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"TrainState({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainState) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable


def _is_dataclass_object(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def capture_plain(value: Any) -> Any:
    """What a per-rank plain value is saved as: a dataclass object as a dict of its fields."""
    if _is_dataclass_object(value):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    return value


def restore_plain(state: MutableMapping[str, Any], name: str, saved: Any) -> None:
    """Put ``saved`` back into ``state[name]`` so references the caller holds see it.

    A dict or list is updated in place, a dataclass object gets its fields set (a frozen one is
    replaced by a copy with the saved fields); anything else (ints, floats, strings: immutable)
    is replaced in ``state``, so the caller reads it back from there.
    """
    current = state[name]
    if _is_dataclass_object(current) and isinstance(saved, dict):
        if type(current).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            state[name] = dataclasses.replace(current, **saved)
        else:
            for field, value in saved.items():
                setattr(current, field, value)
    elif isinstance(current, dict) and isinstance(saved, dict):
        current.clear()
        current.update(saved)
    elif isinstance(current, list) and isinstance(saved, list):
        current[:] = saved
    else:
        state[name] = saved
