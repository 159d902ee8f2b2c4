"""DCP checkpoint metadata as JSON: what trainkit's layout needs, written as data, read back as data.

DCP pickles its ``Metadata``; a pickle read from a bucket can run code, so trainkit never unpickles
metadata. Reading builds DCP's classes from plain JSON values and checks every field's type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "METADATA_FORMAT",
    "RawItem",
    "decode_metadata",
    "encode_metadata",
    "is_plain_file_name",
]

#: Written into every metadata file; anything else is refused.
METADATA_FORMAT = "trainkit-dcp-metadata/1"


@dataclass(frozen=True)
class RawItem:
    """Where one saved item lives: file, byte range, and for tensors the chunk's dtype and shape."""

    relative_path: str
    offset: int
    length: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


def is_plain_file_name(name: str) -> bool:
    """True for a name that stays inside its directory: no separators, not ``.`` or ``..``."""
    return bool(name) and name not in {".", ".."} and "/" not in name and "\\" not in name


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def encode_metadata(metadata: Any) -> bytes:
    """DCP ``Metadata`` (with ``RawItem`` storage data) as JSON bytes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            entries[fqn] = {
                "kind": "tensor",
                "dtype": _dtype_name(entry.properties.dtype),
                "requires_grad": bool(entry.properties.requires_grad),
                "size": list(entry.size),
                "chunks": [
                    {"offsets": list(chunk.offsets), "sizes": list(chunk.sizes)}
                    for chunk in entry.chunks
                ],
            }
        else:
            entries[fqn] = {"kind": "bytes"}
    storage = [
        {
            "fqn": index.fqn,
            "offset": None if index.offset is None else list(index.offset),
            "index": index.index,
            "file": item.relative_path,
            "byte_offset": item.offset,
            "byte_length": item.length,
            "dtype": item.dtype,
            "shape": None if item.shape is None else list(item.shape),
        }
        for index, item in (metadata.storage_data or {}).items()
    ]
    planner = {fqn: list(path) for fqn, path in (metadata.planner_data or {}).items()}
    body = {
        "format": METADATA_FORMAT,
        "state_dict": entries,
        "planner_data": planner,
        "storage": storage,
        "save_id": getattr(metadata.storage_meta, "save_id", None),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise ValueError(f"{what} is not a list of integers: {value!r}")
    return value


def _dtype(name: Any) -> Any:
    import torch

    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


def _tensor_entry(fqn: str, entry: dict[str, Any]) -> Any:
    import torch
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    if not isinstance(entry.get("requires_grad"), bool) or not isinstance(
        entry.get("chunks"), list
    ):
        raise ValueError(f"entry {fqn!r} is malformed")
    return TensorStorageMetadata(
        properties=TensorProperties(
            dtype=_dtype(entry.get("dtype")), requires_grad=entry["requires_grad"]
        ),
        size=torch.Size(_int_list(entry.get("size"), f"size of {fqn!r}")),
        chunks=[
            ChunkStorageMetadata(
                offsets=torch.Size(_int_list(chunk.get("offsets"), f"chunk of {fqn!r}")),
                sizes=torch.Size(_int_list(chunk.get("sizes"), f"chunk of {fqn!r}")),
            )
            for chunk in entry["chunks"]
        ],
    )


def _storage_item(item: dict[str, Any]) -> tuple[Any, RawItem]:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    fqn, name = item.get("fqn"), item.get("file")
    if not isinstance(fqn, str) or not isinstance(name, str) or not is_plain_file_name(name):
        raise ValueError(f"storage entry names {fqn!r} in file {name!r}")
    offset = item.get("offset")
    index = item.get("index")
    if index is not None and not isinstance(index, int):
        raise ValueError(f"storage entry {fqn!r} has index {index!r}")
    byte_offset, byte_length = item.get("byte_offset"), item.get("byte_length")
    _int_list([byte_offset, byte_length], f"byte range of {fqn!r}")
    if byte_offset < 0 or byte_length < 0:
        raise ValueError(f"storage entry {fqn!r} has a negative byte range")
    dtype, shape = item.get("dtype"), item.get("shape")
    if (dtype is None) != (shape is None):
        raise ValueError(f"storage entry {fqn!r} has a dtype without a shape or the reverse")
    if dtype is not None:
        _dtype(dtype)
    return (
        MetadataIndex(
            fqn, None if offset is None else _int_list(offset, f"offset of {fqn!r}"), index
        ),
        RawItem(
            name,
            byte_offset,
            byte_length,
            dtype,
            None if shape is None else tuple(_int_list(shape, f"shape of {fqn!r}")),
        ),
    )


def _planner_path(fqn: str, path: Any) -> tuple[str | int, ...]:
    if not isinstance(path, list) or not all(
        isinstance(part, str | int) and not isinstance(part, bool) for part in path
    ):
        raise ValueError(f"planner path of {fqn!r} is not a list of keys: {path!r}")
    return tuple(path)


def decode_metadata(data: bytes, *, checkpoint_id: str) -> Any:
    """Build DCP ``Metadata`` from what ``encode_metadata`` wrote.

    Raises ``ValueError`` naming the first field that is not what trainkit writes; nothing in
    ``data`` is ever called or imported.
    """
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        StorageMeta,
    )

    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(body, dict) or body.get("format") != METADATA_FORMAT:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"format {found!r} is not {METADATA_FORMAT!r}")
    entries, storage = body.get("state_dict"), body.get("storage")
    planner = body.get("planner_data")
    if not isinstance(entries, dict) or not isinstance(storage, list):
        raise ValueError("state_dict or storage is missing")
    if not isinstance(planner, dict):
        raise ValueError("planner_data is missing")
    state_dict_metadata: dict[str, Any] = {}
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("kind") not in {"tensor", "bytes"}:
            raise ValueError(f"entry {fqn!r} is malformed")
        state_dict_metadata[fqn] = (
            _tensor_entry(fqn, entry) if entry["kind"] == "tensor" else BytesStorageMetadata()
        )
    storage_data = dict(_storage_item(item if isinstance(item, dict) else {}) for item in storage)
    save_id = body.get("save_id")
    return Metadata(
        state_dict_metadata=state_dict_metadata,
        planner_data={fqn: _planner_path(fqn, path) for fqn, path in planner.items()},
        storage_data=storage_data,
        storage_meta=StorageMeta(
            checkpoint_id=checkpoint_id, save_id=save_id if isinstance(save_id, str) else None
        ),
    )
