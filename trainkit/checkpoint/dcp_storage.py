"""DCP storage for trainkit: raw tensor bytes in large checksummed blocks, metadata as JSON.

torch.distributed.checkpoint plans what each rank writes and reads (de-duplication, resharding);
these classes only move bytes. Metadata is JSON (never a pickle), and non-tensor values are loaded
with ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import threading
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    LoadPlan,
    LoadPlanner,
    Metadata,
    SavePlan,
    SavePlanner,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from trainkit.checkpoint.blocks import BufferPool, FileInfo, read_file_ranges
from trainkit.checkpoint.errors import CorruptCheckpointError
from trainkit.checkpoint.metadata import RawItem, decode_metadata, encode_metadata
from trainkit.checkpoint.root import CheckpointRoot

__all__ = [
    "METADATA_NAME",
    "RawItem",
    "SafeLoadPlanner",
    "TrainkitStorageReader",
    "TrainkitStorageWriter",
    "load_metadata",
    "tensor_bytes",
]

METADATA_NAME = ".metadata"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TrainkitStorageWriter(StorageWriter):
    """One ``__<rank>_0.distcp`` file per rank, streamed as raw bytes; rank 0 adds ``.metadata``."""

    def __init__(
        self,
        store: CheckpointRoot,
        step_dir: str,
        pool: BufferPool,
        cancel: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.cancel = cancel
        self.store = store
        self.step_dir = step_dir
        self.pool = pool
        self.files: dict[str, FileInfo] = {}
        self.save_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: Any = None) -> None:
        self.files = {}
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank", 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [
            dataclasses.replace(plan, storage_data=f"__{index}_")
            for index, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data if isinstance(plan.storage_data, str) else "__0_"
        name = f"{prefix}0.distcp"
        writer = self.store.open_writer(f"{self.step_dir}/{name}", self.pool, self.cancel)
        results: list[WriteResult] = []
        offset = 0
        try:
            for item in plan.items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    view = data.getbuffer()
                    raw = RawItem(name, offset, len(view))
                else:
                    assert isinstance(data, torch.Tensor)
                    tensor = data.detach()
                    if tensor.device.type != "cpu":
                        tensor = tensor.cpu()
                    view = tensor_bytes(tensor)
                    raw = RawItem(
                        name, offset, len(view), _dtype_name(tensor.dtype), tuple(tensor.shape)
                    )
                writer.write(view)
                results.append(
                    WriteResult(index=item.index, size_in_bytes=raw.length, storage_data=raw)
                )
                offset += raw.length
        except BaseException:
            writer.abort()
            raise
        self.files[name] = writer.close()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {
            result.index: result.storage_data for rank in results for result in rank
        }
        metadata.storage_meta = self.storage_meta()
        writer = self.store.open_writer(f"{self.step_dir}/{METADATA_NAME}", self.pool)
        try:
            writer.write(encode_metadata(metadata))
        except BaseException:
            writer.abort()
            raise
        self.files[METADATA_NAME] = writer.close()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.step_dir, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def load_metadata(data: bytes, *, where: str, step: int) -> Metadata:
    """DCP metadata from the JSON that ``TrainkitStorageWriter`` wrote; never unpickles."""
    try:
        return decode_metadata(data, checkpoint_id=where.rsplit("/", 1)[0])
    except ValueError as error:
        raise CorruptCheckpointError(
            step,
            f"{where}: metadata refused ({error}); it was not written by this trainkit or is damaged",
        ) from None


class TrainkitStorageReader(StorageReader):
    """Reads what ``TrainkitStorageWriter`` wrote, checking block checksums from the commit record."""

    def __init__(
        self,
        store: CheckpointRoot,
        step_dir: str,
        files: dict[str, FileInfo],
        pool: BufferPool,
        step: int,
        metadata: Metadata,
    ) -> None:
        super().__init__()
        self.store = store
        self.step_dir = step_dir
        self.files = files
        self.pool = pool
        self.step = step
        self.metadata = metadata
        self.storage_data: dict[Any, RawItem] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for request in plan.items:
            per_file.setdefault(self.storage_data[request.storage_index].relative_path, []).append(
                request
            )
        for name, requests in per_file.items():
            if name not in self.files:
                raise CorruptCheckpointError(
                    self.step,
                    f"{self.store.display(self.step_dir)}: metadata refers to {name}, which the "
                    "commit record does not list; the checkpoint is damaged - restore an older step",
                )
            ranges: list[tuple[int, memoryview]] = []
            finishers = []
            for request in requests:
                raw = self.storage_data[request.storage_index]
                if request.type == LoadItemType.BYTE_IO:
                    buffer = bytearray(raw.length)
                    ranges.append((raw.offset, memoryview(buffer)))
                    finishers.append((request, buffer, None))
                    continue
                target = planner.resolve_tensor(request).detach()
                assert raw.dtype is not None and raw.shape is not None
                dtype = getattr(torch, raw.dtype)
                whole = (
                    list(request.storage_offsets) == [0] * len(raw.shape)
                    and tuple(request.lengths) == raw.shape
                )
                if (
                    whole
                    and target.device.type == "cpu"
                    and target.is_contiguous()
                    and target.dtype == dtype
                    and tuple(target.shape) == raw.shape
                ):
                    ranges.append((raw.offset, tensor_bytes(target)))
                    finishers.append((request, None, target))
                else:
                    chunk = torch.empty(raw.shape, dtype=dtype)
                    ranges.append((raw.offset, tensor_bytes(chunk)))
                    finishers.append((request, chunk, target))
            read_file_ranges(
                self.store,
                f"{self.step_dir}/{name}",
                self.files[name],
                ranges,
                self.pool,
                step=self.step,
            )
            for request, loaded, target in finishers:
                if target is None:
                    planner.load_bytes(request, io.BytesIO(loaded))
                    continue
                if loaded is not None:
                    for dim, (start, length) in enumerate(
                        zip(request.storage_offsets, request.lengths, strict=True)
                    ):
                        loaded = loaded.narrow(dim, start, length)
                    target.copy_(loaded)
                planner.commit_tensor(request, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor values are read with ``weights_only=True``."""

    def __init__(self, *, step: int) -> None:
        super().__init__()
        self.step = step

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CorruptCheckpointError(
                self.step,
                f"step {self.step}, key {read_item.dest_index.fqn!r}: refused to unpickle "
                f"({str(error).splitlines()[0]}); checkpoints hold only tensors and plain data",
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
