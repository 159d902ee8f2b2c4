"""Export a committed step as one plain state dict: ``torch.load``-able ``.pt`` or ``.safetensors``.

Reads through the same verified path as ``restore`` (commit record, sizes, block checksums, JSON
metadata, ``weights_only`` loads), needs no process group, and joins whatever number of ranks wrote
the step into full tensors. It never writes into the checkpoint root.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from trainkit.checkpoint.blocks import BufferPool, read_file_ranges
from trainkit.checkpoint.commit import (
    PICKLED_METADATA_FORMAT_VERSION,
    CommitRecord,
    check_sizes,
    read_commit,
    scan_steps,
    step_dir_name,
)
from trainkit.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    find_corruption,
)
from trainkit.checkpoint.layout import rank_file_name
from trainkit.checkpoint.root import CheckpointRoot

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "NoCommittedStepError",
    "export_checkpoint",
    "load_full_state_dict",
    "newest_committed_step",
]

#: ``--to`` choices and the file suffix each writes.
EXPORT_FORMATS: dict[str, str] = {"torch": ".pt", "safetensors": ".safetensors"}
#: ``--dtype`` names; floating-point tensors are cast, integer and bool tensors are kept.
EXPORT_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")

#: Tensors loaded per batch while writing safetensors: bounds memory to about one batch.
_SAFETENSORS_BATCH_BYTES = 1 << 30
_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


class NoCommittedStepError(CheckpointError):
    """The root holds no committed step (or not the one asked for)."""


def newest_committed_step(store: CheckpointRoot) -> int:
    """The newest step with a commit record; ``NoCommittedStepError`` naming the root when none."""
    committed = scan_steps(store)[0]
    if not committed:
        raise NoCommittedStepError(
            f"no committed step found at {store.url}; check the path (it must hold step_<n>/ "
            "directories with a COMMIT.json) or wait for the first save to commit"
        )
    return committed[-1]


def _torch_dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(EXPORT_DTYPES)}")
    return dtypes[name]


class _StepReader:
    """One verified step: its record, DCP metadata and per-rank files, read without a process group."""

    def __init__(self, store: CheckpointRoot, step: int) -> None:
        from trainkit.checkpoint.dcp_storage import METADATA_NAME, load_metadata

        self.store = store
        self.step = step
        self.step_dir = store.join(step_dir_name(step))
        self.pool = BufferPool(num_buffers=2)
        if step not in scan_steps(store)[0]:
            raise NoCommittedStepError(
                f"step {step} is not committed at {store.url} (committed: "
                f"{scan_steps(store)[0] or 'none'}); run `trainkit ckpt list {store.url}`"
            )
        self.record: CommitRecord = read_commit(store, self.step_dir, step)
        if self.record.format_version == PICKLED_METADATA_FORMAT_VERSION:
            raise UnsupportedCheckpointError(
                step,
                f"checkpoint step {step} at {store.display(self.step_dir)} has pickled metadata "
                f"(commit format {self.record.format_version}); trainkit refuses pickles because a "
                "crafted one runs code",
            )
        check_sizes(store, self.step_dir, self.record, step)
        self.metadata = load_metadata(
            self.read_file(METADATA_NAME),
            where=store.display(f"{self.step_dir}/{METADATA_NAME}"),
            step=step,
        )

    def read_file(self, name: str) -> bytes:
        info = self.record.files.get(name)
        if info is None:
            raise CorruptCheckpointError(
                self.step, f"{self.store.display(self.step_dir)}: the commit record lists no {name}"
            )
        data = bytearray(info.size)
        read_file_ranges(
            self.store,
            f"{self.step_dir}/{name}",
            info,
            [(0, memoryview(data))],
            self.pool,
            step=self.step,
        )
        return bytes(data)

    def top_level_keys(self) -> list[str]:
        return sorted({path[0] for path in self.metadata.planner_data.values()})

    def fqns_under(self, key: str | None) -> list[str]:
        """Flattened DCP keys of the global entry ``key`` (all of them when None)."""
        planner = self.metadata.planner_data
        return sorted(
            fqn
            for fqn in self.metadata.state_dict_metadata
            if key is None or planner.get(fqn, (fqn,))[0] == key
        )

    def load_flat(self, fqns: list[str]) -> dict[str, Any]:
        """``{fqn: value}`` for these flattened keys: full tensors joined from every saved rank."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from trainkit.checkpoint.dcp_storage import SafeLoadPlanner, TrainkitStorageReader

        flat: dict[str, Any] = {}
        for fqn in fqns:
            entry = self.metadata.state_dict_metadata[fqn]
            if isinstance(entry, TensorStorageMetadata):
                flat[fqn] = torch.empty(entry.size, dtype=entry.properties.dtype)
            else:
                flat[fqn] = None  # a non-tensor value: DCP reads it as bytes into this key
        if not flat:
            return flat
        reader = TrainkitStorageReader(
            self.store, self.step_dir, self.record.files, self.pool, self.step, self.metadata
        )
        with warnings.catch_warnings():
            # no_dist is the point here (one process reads every rank's files), not a mistake.
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            try:
                dcp.load(
                    flat,
                    storage_reader=reader,
                    planner=SafeLoadPlanner(step=self.step),
                    no_dist=True,
                )
            except (Exception, CheckpointException) as error:  # DCP's is a BaseException
                corrupt = find_corruption(error)
                if corrupt is not None:
                    raise corrupt from None
                raise
        return flat

    def rank_entries(self) -> dict[str, Any]:
        """Rank 0's per-rank entries (plain data, Stateful objects' state), without RNG states."""
        import torch

        name = rank_file_name(0)
        try:
            loaded = torch.load(io.BytesIO(self.read_file(name)), weights_only=True)
        except CheckpointError:
            raise
        except Exception as error:
            raise CorruptCheckpointError(
                self.step,
                f"{self.store.display(self.step_dir)}/{name}: refused to load "
                f"({str(error).splitlines()[0]}); per-rank files hold only tensors and plain data",
            ) from None
        return dict(loaded.get("entries", {}))

    def nest(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """Flattened keys back into the nested dicts (and lists) the state was saved as."""
        from torch.distributed.checkpoint._nested_dict import set_element

        nested: dict[str, Any] = {}
        for fqn, value in flat.items():
            set_element(nested, self.metadata.planner_data.get(fqn, (fqn,)), value)
        return nested


def _strip(state: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    if not prefix:
        return state
    return {
        (name.removeprefix(prefix) if isinstance(name, str) else name): value
        for name, value in state.items()
    }


def _cast(value: Any, dtype: Any) -> Any:
    import torch

    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def load_full_state_dict(
    root: str | os.PathLike[str],
    step: int | None = None,
    *,
    key: str | None = None,
    dtype: str | None = None,
    strip_prefix: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One plain state dict of a committed step (default: the newest), as ``torch.load`` gives it.

    Without ``key``: ``{"model": {...}, "optimizer": {...}, "iter_num": 3, ...}``: every global
    entry (modules, optimizers, top-level tensors) with full tensors however many ranks wrote
    them, plus rank 0's per-rank entries (plain data, loader state; never RNG states). With ``key``
    (e.g. ``"model"``): only that entry's state dict. Module keys are the bare module's: DDP's
    ``module.`` and ``torch.compile``'s ``_orig_mod.`` were already dropped at save; ``strip_prefix``
    removes another prefix where present from the keys of ``key``'s entry (of ``"model"`` without
    ``key``). ``dtype`` (``bf16``, ``fp16``,
    ``fp32``) casts floating-point tensors. Every byte read is checked against the commit record;
    a damaged file raises ``CorruptCheckpointError`` naming it.
    """
    store = CheckpointRoot(os.fspath(root), storage_options)
    torch_dtype = _torch_dtype(dtype)
    reader = _StepReader(store, newest_committed_step(store) if step is None else step)
    if key is not None and not reader.fqns_under(key):
        entries = reader.rank_entries()
        if key not in entries:
            raise KeyError(
                f"step {reader.step} at {store.url} has no entry {key!r} (it has "
                f"{sorted(set(reader.top_level_keys()) | set(entries))}); pass --key with one of those"
            )
        value = entries[key]
        if not isinstance(value, dict):
            return {key: _cast(value, torch_dtype)}
        return _strip(
            {name: _cast(item, torch_dtype) for name, item in value.items()}, strip_prefix
        )
    flat = reader.load_flat(reader.fqns_under(key))
    for fqn in flat:
        flat[fqn] = _cast(flat[fqn], torch_dtype)
    nested = reader.nest(flat)
    if key is not None:
        return _strip(nested[key], strip_prefix)
    for name, value in reader.rank_entries().items():
        nested.setdefault(name, value)
    if strip_prefix and isinstance(nested.get("model"), dict):
        nested["model"] = _strip(nested["model"], strip_prefix)
    return nested


def export_checkpoint(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    step: int | None = None,
    *,
    to: str = "torch",
    key: str | None = None,
    dtype: str | None = None,
    strip_prefix: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a committed step (default: the newest) to one file and return its path.

    ``to="torch"`` writes what ``torch.load(path, weights_only=True)`` reads back (see
    ``load_full_state_dict`` for what it holds); ``to="safetensors"`` writes tensors only, so it
    needs ``key`` (usually ``"model"``) or a state of tensors only, and streams batches of about
    1 GiB so memory holds one batch, not the model. ``out`` defaults to
    ``step_<n>[-<key>].pt|.safetensors`` in the current directory; the file appears whole (written
    to a temporary name, then renamed).
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"--to {to!r} is not one of {', '.join(EXPORT_FORMATS)}")
    _torch_dtype(dtype)  # validates before any reading
    store = CheckpointRoot(os.fspath(root), storage_options)
    step = newest_committed_step(store) if step is None else step
    if out is None:
        out = f"step_{step}{'-' + key if key else ''}{EXPORT_FORMATS[to]}"
    out = os.fspath(out)
    temporary = f"{out}.tmp-{os.getpid()}"
    try:
        if to == "torch":
            import torch

            state = load_full_state_dict(
                root,
                step,
                key=key,
                dtype=dtype,
                strip_prefix=strip_prefix,
                storage_options=storage_options,
            )
            torch.save(state, temporary)  # a path: torch's own file writer, faster than a handle
            del state
        else:
            with open(temporary, "wb") as handle:
                _write_safetensors(
                    handle,
                    _StepReader(store, step),
                    key=key,
                    dtype=dtype,
                    strip_prefix=strip_prefix,
                )
        _fsync(temporary)
        os.replace(temporary, out)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_plan(
    reader: _StepReader, key: str | None, dtype: Any, strip_prefix: str | None
) -> list[tuple[str, str, Any, list[int]]]:
    """(fqn, output name, output dtype, shape) per tensor, in output order; refuses non-tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    fqns = reader.fqns_under(key)
    if key is not None and not fqns:
        raise KeyError(
            f"step {reader.step} at {reader.store.url} has no global entry {key!r} (it has "
            f"{reader.top_level_keys()}); safetensors export takes a module, optimizer or tensor"
        )
    metadata, planner = reader.metadata.state_dict_metadata, reader.metadata.planner_data
    not_tensors = [fqn for fqn in fqns if not isinstance(metadata[fqn], TensorStorageMetadata)]
    if not_tensors:
        raise ValueError(
            f"safetensors holds only tensors; step {reader.step} has non-tensor values "
            f"{not_tensors[:5]}{' ...' if len(not_tensors) > 5 else ''}: export with --model-only "
            "(or --key NAME of a module) or --to torch"
        )
    plan = []
    for fqn in fqns:
        path = planner.get(fqn, (fqn,))
        inside = path[1:] if key is not None and len(path) > 1 else path  # a tensor entry: its key
        name = ".".join(str(part) for part in inside)
        if strip_prefix:
            name = name.removeprefix(strip_prefix)
        entry = metadata[fqn]
        out_dtype = (
            dtype
            if dtype is not None and entry.properties.dtype.is_floating_point
            else entry.properties.dtype
        )
        if str(out_dtype).removeprefix("torch.") not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {out_dtype}, which safetensors cannot hold"
            )
        plan.append((fqn, name, out_dtype, list(entry.size)))
    names = [name for _, name, _, _ in plan]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two tensors export under the same name after --strip-prefix {strip_prefix!r}"
        )
    return plan


def _write_safetensors(
    handle: Any,
    reader: _StepReader,
    *,
    key: str | None,
    dtype: str | None,
    strip_prefix: str | None,
) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian tensor bytes),
    written tensor by tensor so only one batch is in memory."""
    from trainkit.checkpoint.dcp_storage import tensor_bytes

    plan = _safetensors_plan(reader, key, _torch_dtype(dtype), strip_prefix)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "trainkit_step": str(reader.step)}}
    offset = 0
    sizes = []
    for _fqn, name, out_dtype, shape in plan:
        size = out_dtype.itemsize
        for dim in shape:
            size *= dim
        sizes.append(size)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(out_dtype).removeprefix("torch.")],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)
    for batch in _batches(plan, sizes):
        flat = reader.load_flat([fqn for fqn, _, _, _ in batch])
        for fqn, _name, out_dtype, _shape in batch:
            handle.write(tensor_bytes(flat.pop(fqn).to(out_dtype)))


def _batches(
    plan: list[tuple[str, str, Any, list[int]]], sizes: list[int]
) -> Iterator[list[tuple[str, str, Any, list[int]]]]:
    batch: list[tuple[str, str, Any, list[int]]] = []
    batch_bytes = 0
    for item, size in zip(plan, sizes, strict=True):
        if batch and batch_bytes + size > _SAFETENSORS_BATCH_BYTES:
            yield batch
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += size
    if batch:
        yield batch
