"""Turning loaded row groups into one batch: a dict of tensors (one gather per row group and column,
optionally into preallocated shared slots), or whatever the user's ``transform`` makes of an Arrow batch.

Nothing here reads files or decides which rows belong to a batch (``plan`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from shards.errors import ShardsError
from shards.plan import PlannedBatch

__all__ = ["INDEX_KEY", "PADDING_KEY", "BatchAssembler", "add_flags", "flags_layout"]

INDEX_KEY = "_index"  # global row ids (manifest order), with with_index=True
PADDING_KEY = "_padding"  # True for repeated samples filling the last batches, with drop_last=False

TensorLayout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def flags_layout(batch_size: int, *, with_index: bool, pad_flags: bool) -> TensorLayout:
    """Shape and dtype of ``_index`` and ``_padding`` in a batch, those that are wanted."""
    layout: TensorLayout = {}
    if with_index:
        layout[INDEX_KEY] = ((batch_size,), torch.int64)
    if pad_flags:
        layout[PADDING_KEY] = ((batch_size,), torch.bool)
    return layout


def add_flags(
    result: MutableMapping[str, Any],
    *,
    index: np.ndarray | None,
    padding: np.ndarray | None,
    outputs: Mapping[str, np.ndarray] | None,
) -> None:
    """Adds ``_index`` and ``_padding`` (those not None, arrays the batch may own) to ``result``,
    and writes them into ``outputs`` (shared slots) when given."""
    for key, values in ((INDEX_KEY, index), (PADDING_KEY, padding)):
        if values is not None:
            result[key] = torch.from_numpy(values)
            if outputs is not None:
                outputs[key][...] = values


@dataclass(frozen=True)
class BatchAssembler:
    """Builds batches of ``batch_size`` from the selected ``columns`` of ``schema``.

    ``rg_offsets`` (global row id of each row group's first row) gives ``_index`` with ``with_index``;
    ``pad_flags`` adds ``_padding`` (used with ``drop_last=False``).
    """

    schema: pa.Schema
    columns: Sequence[str]
    batch_size: int
    rg_offsets: np.ndarray
    with_index: bool
    pad_flags: bool
    transform: Callable[[pa.RecordBatch], Any] | None = None

    def layout(self) -> TensorLayout:
        """Shape and dtype of every tensor in a batch (tensor columns only, no transform)."""
        layout: TensorLayout = {}
        for name in self.columns:
            type_, shape = self.schema.field(name).type, [self.batch_size]
            while pa.types.is_fixed_size_list(type_):
                shape.append(type_.list_size)
                type_ = type_.value_type
            dtype = (
                np.dtype(bool) if pa.types.is_boolean(type_) else np.dtype(type_.to_pandas_dtype())
            )
            layout[name] = (tuple(shape), torch.from_numpy(np.empty(0, dtype)).dtype)
        layout.update(
            flags_layout(self.batch_size, with_index=self.with_index, pad_flags=self.pad_flags)
        )
        return layout

    def assemble(
        self,
        planned: PlannedBatch,
        loaded: Mapping[int, Any],
        outputs: Mapping[str, np.ndarray] | None = None,
    ) -> Any:
        """The batch; written into ``outputs`` (shared slots of ``layout()``) when given.

        ``loaded`` maps each row group to its columns as numpy arrays, or to its Arrow record batch
        when there is a ``transform``.
        """
        groups, rows = planned.groups, planned.rows
        bounds = np.flatnonzero(np.diff(groups)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [len(groups)]])
        if self.transform is not None:
            parts = [
                loaded[int(groups[a])].take(pa.array(rows[a:b]))
                for a, b in zip(starts, stops, strict=True)
            ]
            result = self.transform(pa.Table.from_batches(parts).combine_chunks().to_batches()[0])
            if not isinstance(result, MutableMapping):
                if self.with_index or self.pad_flags:
                    raise ShardsError(self._flags_need_a_mapping(result))
                return result
        else:
            result = {}
            for name in self.columns:
                views = {group: arrays[name] for group, arrays in loaded.items()}
                first = views[int(groups[0])]
                if outputs is not None:
                    out = outputs[name]
                else:
                    out = np.empty((len(groups), *first.shape[1:]), dtype=first.dtype)
                for a, b in zip(starts, stops, strict=True):
                    view, src = views[int(groups[a])], rows[a:b]
                    if src[-1] - src[0] == b - a - 1:  # consecutive rows: one memcpy
                        out[a:b] = view[src[0] : src[-1] + 1]
                    else:  # mode="raise" would buffer the whole gather
                        np.take(view, src, axis=0, out=out[a:b], mode="clip")
                result[name] = torch.from_numpy(out)
        add_flags(
            result,
            index=self.rg_offsets[groups] + rows if self.with_index else None,
            padding=planned.padding.copy() if self.pad_flags else None,
            outputs=outputs,
        )
        return result

    def _flags_need_a_mapping(self, result: Any) -> str:
        needs = [
            f"{key!r} ({why})"
            for key, why, wanted in (
                (PADDING_KEY, "drop_last=False flags repeated samples", self.pad_flags),
                (INDEX_KEY, "with_index=True", self.with_index),
            )
            if wanted
        ]
        return (
            f"transform returned a {type(result).__name__}, but batches must be dicts here so that "
            f"{' and '.join(needs)} can be added; return a dict from the transform (e.g. "
            "{'x': x, 'y': y}), or use drop_last=True and with_index=False"
        )
