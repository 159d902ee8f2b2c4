"""The restore path: list committed steps newest first, verify each, agree across ranks, load the
first that every rank can load, and fall back past damaged ones with a warning.

It never writes to the checkpoint root, so a full or read-only volume can still be restored from.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import MutableMapping
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
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    find_corruption,
)
from trainkit.checkpoint.groups import CheckpointGroups
from trainkit.checkpoint.layout import (
    check_keys,
    is_stateful,
    model_of,
    rank_file_name,
    split_state,
)
from trainkit.checkpoint.root import CheckpointRoot

__all__ = ["Restorer"]

logger = logging.getLogger("trainkit.checkpoint.manager")


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


class Restorer:
    """Loads committed steps from ``root`` into a state, on every rank of ``groups`` together."""

    def __init__(
        self,
        root: CheckpointRoot,
        *,
        world: Any,
        groups: CheckpointGroups,
        pool: BufferPool,
        capture_rng: bool,
    ) -> None:
        self.root = root
        self.world = world
        self.groups = groups
        self.pool = pool
        self.capture_rng = capture_rng

    def restore_newest(self, state: MutableMapping[str, Any]) -> int | None:
        """Load the newest committed step that verifies into ``state``; return it, or None if none.

        A step whose record or files do not verify is skipped with a warning and the previous one
        is tried. A checkpoint that does not fit ``state`` raises ``CheckpointMismatchError``.
        """
        committed = self.groups.broadcast(scan_steps(self.root)[0] if self.world.is_main else None)
        refused: UnsupportedCheckpointError | None = None
        for step in reversed(committed):
            try:
                self.restore_step(step, state)
            except (CorruptCheckpointError, UnsupportedCheckpointError) as error:
                if isinstance(error, UnsupportedCheckpointError):
                    refused = refused or error
                warnings.warn(f"trainkit: skipping checkpoint step {step}: {error}", stacklevel=3)
                logger.warning("trainkit: skipping checkpoint step %d: %s", step, error)
                continue
            logger.info("trainkit: restored step %d from %s", step, self.root.url)
            return step
        if refused is not None:
            # Starting from scratch beside checkpoints this version refuses would silently lose them.
            raise refused
        return None

    def restore_step(self, step: int, state: MutableMapping[str, Any]) -> None:
        """Load one step into ``state``; raises CorruptCheckpointError on every rank together."""
        import torch.distributed.checkpoint as dcp

        from trainkit.checkpoint.dcp_storage import (
            METADATA_NAME,
            SafeLoadPlanner,
            TrainkitStorageReader,
            load_metadata,
        )

        step_dir = self.root.join(step_dir_name(step))
        record = metadata = None
        problem = None
        try:
            record = read_commit(self.root, step_dir, step)
            if record.format_version == PICKLED_METADATA_FORMAT_VERSION:
                raise UnsupportedCheckpointError(
                    step,
                    f"checkpoint step {step} at {self.root.display(step_dir)} has pickled metadata "
                    f"(commit format {record.format_version}, trainkit "
                    f"{record.versions.get('trainkit', '?')}); restore refuses pickles because a "
                    "crafted one runs code. Start a new checkpoint root, or move this step aside",
                )
            metadata = load_metadata(
                self._read_verified(step_dir, METADATA_NAME, record, step),
                where=self.root.display(f"{step_dir}/{METADATA_NAME}"),
                step=step,
            )
            check_sizes(self.root, step_dir, record, step)
        except (CorruptCheckpointError, UnsupportedCheckpointError) as error:
            problem = error
        if not self.groups.agree_all(problem is None):
            raise problem or CorruptCheckpointError(
                step, f"step {step} failed verification on another rank"
            )
        assert record is not None and metadata is not None
        global_state, _, stateful = split_state(state, per_rank=False)
        check_keys(step, global_state, metadata, self.root.display(step_dir))
        if global_state:
            reader = TrainkitStorageReader(
                self.root, step_dir, record.files, self.pool, step, metadata
            )
            try:
                dcp.load(
                    global_state,
                    storage_reader=reader,
                    planner=SafeLoadPlanner(step=step),
                    process_group=self.groups.save_group,
                    no_dist=not self.groups.distributed,
                )
            except CorruptCheckpointError:
                raise
            except (Exception, _checkpoint_exception()) as error:  # DCP's is a BaseException
                corrupt = find_corruption(error)
                if corrupt is not None:
                    raise corrupt from None
                raise
        rank_states: list[dict[str, Any]] | None = None
        problem = None
        try:
            rank_states = self._read_rank_states(step_dir, record, step)
        except CorruptCheckpointError as error:
            problem = error
        if not self.groups.agree_all(problem is None):
            raise problem or CorruptCheckpointError(
                step, f"step {step}: a per-rank file failed verification on another rank"
            )
        assert rank_states is not None
        self.apply_loaded(step, state, global_state, stateful, rank_states, record)

    def apply_loaded(
        self,
        step: int,
        state: MutableMapping[str, Any],
        global_state: dict[str, Any],
        modules: dict[str, Any],
        rank_states: list[dict[str, Any]],
        record: CommitRecord,
    ) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from trainkit.checkpoint.rank_state import restore_rng_state
        from trainkit.checkpoint.train_state import restore_plain

        for name, value in state.items():
            if name not in global_state:
                continue
            if isinstance(value, torch.nn.Module):
                set_model_state_dict(value, global_state[name])
            elif isinstance(value, torch.optim.Optimizer):
                set_optimizer_state_dict(model_of(name, value, modules), value, global_state[name])
        same_world = record.world_size == self.world.world_size
        own = (
            rank_states[self.world.rank]
            if same_world
            else rank_states[min(self.world.rank, len(rank_states) - 1)]
        )
        for name, value in list(state.items()):
            if name in global_state:
                continue
            if name not in own["entries"]:
                raise CheckpointMismatchError(
                    step,
                    f"step {step}: state entry {name!r} is not in the checkpoint (it has "
                    f"{sorted(own['entries']) + sorted(global_state)}); restore with the state it was saved "
                    "with, or start a new checkpoint root",
                    [name],
                )
            # After a world change, state that was the same on every saved rank is simply restored.
            uniform = not same_world and _same_on_every_rank(
                [rank_state["entries"].get(name) for rank_state in rank_states]
            )
            if isinstance(value, torch.Generator):
                if same_world or uniform:
                    value.set_state(own["entries"][name])
                elif self.world.is_main:
                    logger.warning(
                        "trainkit: world size changed (%d -> %d); generator %r differed between "
                        "saved ranks and is not restored",
                        record.world_size,
                        self.world.world_size,
                        name,
                    )
            elif not same_world and callable(getattr(value, "load_rank_state_dicts", None)):
                value.load_rank_state_dicts(
                    [rank_state["entries"][name] for rank_state in rank_states]
                )
            elif is_stateful(value):
                if not same_world and not uniform:
                    logger.warning(
                        "trainkit: world size changed (%d -> %d); %r differed between saved ranks "
                        "and gets the state of saved rank %d",
                        record.world_size,
                        self.world.world_size,
                        name,
                        own["rank"],
                    )
                value.load_state_dict(own["entries"][name])
            else:
                restore_plain(state, name, own["entries"][name])
        if self.capture_rng and own.get("rng") is not None:
            if same_world or _same_on_every_rank(
                [rank_state.get("rng") for rank_state in rank_states]
            ):
                restore_rng_state(own["rng"])
            elif self.world.is_main:
                logger.warning(
                    "trainkit: world size changed (%d -> %d); random generators are not restored",
                    record.world_size,
                    self.world.world_size,
                )

    def _read_verified(self, step_dir: str, name: str, record: CommitRecord, step: int) -> bytes:
        info = record.files.get(name)
        if info is None:
            raise CorruptCheckpointError(
                step, f"{self.root.display(step_dir)}: the commit record lists no {name}"
            )
        data = bytearray(info.size)
        try:
            read_file_ranges(
                self.root,
                f"{step_dir}/{name}",
                info,
                [(0, memoryview(data))],
                self.pool,
                step=step,
            )
        except FileNotFoundError:
            raise CorruptCheckpointError(
                step, f"{self.root.display(step_dir)}/{name}: missing"
            ) from None
        return bytes(data)

    def _read_rank_states(
        self, step_dir: str, record: CommitRecord, step: int
    ) -> list[dict[str, Any]]:
        import torch

        ranks = (
            [self.world.rank]
            if record.world_size == self.world.world_size
            else range(record.world_size)
        )
        states: dict[int, dict[str, Any]] = {}
        for rank in ranks:
            data = self._read_verified(step_dir, rank_file_name(rank), record, step)
            try:
                states[rank] = torch.load(io.BytesIO(data), weights_only=True)
            except Exception as error:
                raise CorruptCheckpointError(
                    step,
                    f"{self.root.display(step_dir)}/{rank_file_name(rank)}: refused to load "
                    f"({str(error).splitlines()[0]}); per-rank files hold only tensors and plain data",
                ) from None
        if record.world_size == self.world.world_size:
            return [
                states[self.world.rank] if rank == self.world.rank else {}
                for rank in range(record.world_size)
            ]
        return [states[rank] for rank in range(record.world_size)]


def _same_on_every_rank(values: list[Any]) -> bool:
    return all(_same_state(values[0], other) for other in values[1:])


def _same_state(first: Any, other: Any) -> bool:
    """Deep equality for the plain data and tensors that per-rank files hold."""
    import torch

    if isinstance(first, torch.Tensor) or isinstance(other, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(other, torch.Tensor)
            and first.dtype == other.dtype
            and first.shape == other.shape
            and bool(torch.equal(first, other))
        )
    if isinstance(first, dict) and isinstance(other, dict):
        return first.keys() == other.keys() and all(
            _same_state(first[key], other[key]) for key in first
        )
    if isinstance(first, list | tuple) and isinstance(other, list | tuple):
        return (
            type(first) is type(other)
            and len(first) == len(other)
            and all(_same_state(a, b) for a, b in zip(first, other, strict=True))
        )
    return type(first) is type(other) and first == other
