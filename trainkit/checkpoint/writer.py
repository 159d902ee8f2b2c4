"""Writing one step: every rank's DCP and per-rank files, the agreement that all are durable, the
commit record, and removal of a step that did not commit. Never decides when to save or what to keep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainkit.checkpoint.blocks import BufferPool, FileInfo, write_file
from trainkit.checkpoint.commit import (
    COMMIT_NAME,
    CommitRecord,
    step_dir_name,
    verify_step,
    write_commit,
)
from trainkit.checkpoint.errors import (
    CheckpointSaveError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    describe_failure,
)
from trainkit.checkpoint.groups import CheckpointGroups
from trainkit.checkpoint.layout import rank_file_name
from trainkit.checkpoint.root import CheckpointRoot

__all__ = ["AbandonedSave", "Snapshot", "StepWriter"]

logger = logging.getLogger("trainkit.checkpoint.manager")


@dataclass
class Snapshot:
    """One step captured for writing: DCP state, this rank's file, and timings."""

    step: int
    global_state: dict[str, Any]
    rank_bytes: bytes
    started: float
    blocking_s: float = 0.0
    cancel: threading.Event | None = None  # set to abandon a background save


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _rank_failure(rank: int, error: BaseException) -> str:
    """One line for a failed write; DCP's own exception already names every failed rank."""
    if isinstance(getattr(error, "failures", None), dict):
        return describe_failure(error)
    return f"rank {rank}: {describe_failure(error)}"


class AbandonedSave(Exception):
    """The in-flight save was given up to leave the grace period to the preemption save."""


class StepWriter:
    """Writes and commits steps under ``root``; ``on_commit(step)`` runs on rank 0 after a commit."""

    def __init__(
        self,
        root: CheckpointRoot,
        *,
        world: Any,
        groups: CheckpointGroups,
        pool: BufferPool,
        on_commit: Callable[[int], None],
    ) -> None:
        self.root = root
        self.world = world
        self.groups = groups
        self.pool = pool
        self._on_commit = on_commit

    def write(self, snapshot: Snapshot) -> None:
        """Write every rank's files of ``snapshot`` and commit them; all ranks call it together.

        Raises ``CheckpointSaveError`` when the step was not committed (its files are then already
        removed) and ``AbandonedSave`` when its ``cancel`` event stopped it.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultSavePlanner

        from trainkit.checkpoint.dcp_storage import TrainkitStorageWriter

        step = snapshot.step
        cancel = snapshot.cancel or threading.Event()
        step_dir = self.root.join(step_dir_name(step))
        files: dict[str, FileInfo] = {}
        failure: str | None = None
        try:
            self.root.makedirs(step_dir)
        except Exception as error:
            failure = (
                f"rank {self.world.rank}: cannot create {step_dir}: {type(error).__name__}: {error}"
            )
        try:
            # Entered even after a failure above: DCP's collectives then fail on every rank together.
            writer = TrainkitStorageWriter(self.root, step_dir, self.pool, cancel)
            dcp.save(
                snapshot.global_state,
                storage_writer=writer,
                planner=DefaultSavePlanner(),
                process_group=self.groups.save_group,
                no_dist=not self.groups.distributed,
            )
            files.update(writer.files)
            if failure is None:
                name = rank_file_name(self.world.rank)
                files[name] = write_file(
                    self.root, f"{step_dir}/{name}", [snapshot.rank_bytes], self.pool
                )
                self.root.fsync_dir(step_dir)
        except (Exception, _checkpoint_exception()) as error:  # DCP's is a BaseException
            if not cancel.is_set():
                logger.error(
                    "trainkit: writing step %d failed on rank %d: %s",
                    step,
                    self.world.rank,
                    describe_failure(error),
                )
            failure = failure or _rank_failure(self.world.rank, error)
        if cancel.is_set():
            failure = "abandoned"
        # Every rank reports; rank 0 commits only if all files of all ranks are durable.
        reports = self.groups.gather((files, failure))
        outcome: str | None = None
        if self.world.is_main:
            # DCP reports every rank's error on every rank: list each once.
            problems = list(dict.fromkeys(problem for _files, problem in reports if problem))
            if problems:
                outcome = "; ".join(problems)
            else:
                merged: dict[str, FileInfo] = {}
                for rank_files, _ in reports:
                    merged.update(rank_files)
                outcome = self._commit(step, step_dir, merged)
        outcome = self.groups.broadcast(outcome, background=True)
        if outcome:
            self._remove_partial_step(step, step_dir)
        if outcome and cancel.is_set():
            raise AbandonedSave()
        if outcome:
            raise CheckpointSaveError(
                step, f"checkpoint step {step} under {self.root.url} was not committed: {outcome}"
            )

    def _remove_partial_step(self, step: int, step_dir: str) -> None:
        """Delete an uncommitted step's files now: after a full disk, waiting for the next commit
        to clean them would keep the volume full and fail every later save too."""
        try:
            self.root.remove_tree(step_dir)
        except OSError as error:  # another rank may be removing the same shared directory
            logger.warning("trainkit: removing uncommitted step %d failed: %s", step, error)

    def _commit(self, step: int, step_dir: str, files: dict[str, FileInfo]) -> str | None:
        try:
            record = CommitRecord(
                step=step,
                world_size=self.world.world_size,
                files=files,
                created_unix_s=time.time(),
                versions=_versions(),
            )
            write_commit(self.root, step_dir, record)
        except Exception as error:
            logger.exception("trainkit: committing step %d failed", step)
            return f"commit record: {type(error).__name__}: {error}"
        self._on_commit(step)
        return None

    def existing_step_verdict(self, step: int) -> str:
        """ "absent", "committed" (and verified), or why an existing step cannot be replaced; a
        committed step that does not verify is uncommitted and removed, then "absent"."""
        step_dir = self.root.join(step_dir_name(step))
        if not self.root.exists(f"{step_dir}/{COMMIT_NAME}"):
            return "absent"
        try:
            verify_step(self.root, step, self.pool)
        except UnsupportedCheckpointError as error:
            return (
                f"checkpoint step {step} already exists in a format this trainkit does not "
                f"understand ({error}); not replacing it - upgrade trainkit or use another root"
            )
        except CorruptCheckpointError as error:
            logger.warning(
                "trainkit: committed step %d does not verify (%s); replacing it", step, error
            )
            # Drop the record first: a half-deleted step is then uncommitted, never corrupt-looking.
            self.root.remove_tree(f"{step_dir}/{COMMIT_NAME}")
            self.root.remove_tree(step_dir)
            return "absent"
        return "committed"


def _versions() -> dict[str, str]:
    import torch

    from trainkit import __version__

    return {"trainkit": __version__, "torch": torch.__version__}
