"""CheckpointManager: committed-or-invisible checkpoints, async saves and agreed preemption saves.

Model and optimizer state go through torch.distributed.checkpoint (de-duplication, resharding);
per-rank state (RNG, data position, extras) goes to one file per rank. A step becomes visible only
when rank 0 writes its commit record after every rank's files are durable.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable, MutableMapping
from typing import Any, NoReturn

from trainkit.checkpoint.blocks import BufferPool
from trainkit.checkpoint.commit import (
    COMMIT_NAME,
    classify_steps,
    scan_steps,
    step_dir_name,
)
from trainkit.checkpoint.errors import (
    CheckpointError,
    CheckpointSaveError,
)
from trainkit.checkpoint.groups import CheckpointGroups
from trainkit.checkpoint.layout import rank_file_name, serialize_rank_state, split_state
from trainkit.checkpoint.memory_checkpoints import MemoryCheckpoints
from trainkit.checkpoint.preempted_exit import exit_preempted, track_open_manager, untrack_manager
from trainkit.checkpoint.restore import Restorer
from trainkit.checkpoint.retention import plan_retention
from trainkit.checkpoint.root import CheckpointRoot
from trainkit.checkpoint.staging import HostStaging
from trainkit.checkpoint.writer import AbandonedSave, Snapshot, StepWriter
from trainkit.preemption import (
    EXIT_PREEMPTED,
    GRACE_PERIOD_VARIABLE,
    PreemptionSignal,
    note_agreed_preemption,
    read_grace_period_s,
)

__all__ = ["GRACE_PERIOD_VARIABLE", "CheckpointManager", "exit_preempted", "rank_file_name"]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Save and restore training state under ``root`` (a local path or any fsspec URL).

    Args:
        root: directory or URL holding ``step_<n>/`` directories (``/ckpt``, ``s3://bucket/run``).
        interval_steps: ``maybe_save`` saves when ``step % interval_steps == 0`` (default None: only
            on preemption).
        keep_last: committed steps to keep (default 3; None keeps all).
        keep_every: also keep every step divisible by this (default None).
        async_save: ``save`` blocks only for the copy to host memory (default True).
        storage_options: passed to fsspec (credentials, endpoint).
        world: the ``World`` (default: the one ``trainkit.init()`` joined, else ``World.from_env()``).
        signals: signals that request a preemption save (default SIGTERM); None installs no handler.
        capture_rng: save and restore torch/CUDA/numpy/Python RNG state per rank (default True).
        grace_period_s: seconds from SIGTERM to SIGKILL (default ``$TRAINKIT_GRACE_PERIOD_S``).
        memory_interval_steps: also snapshot into pod memory (/dev/shm) every this many steps and at
            every storage save (default None: no memory tier); see ``memory_checkpoints``.
        memory_keep: memory snapshots kept per rank (default 2).
        replicate: push each memory snapshot to the next pod's replica server: True, False, or
            "auto" (default: when trainkit-run started a replica server on more than one pod).
        replicate_bytes_per_s: throttle for that push (default None: unthrottled).

    ``state`` maps names to: ``nn.Module`` and optimizers (saved once through DCP, resharded on
    load), top-level tensors (global, like weights: replicated ranks write them once), and per-rank
    entries kept in one file per rank: ``torch.Generator``, objects with ``state_dict`` /
    ``load_state_dict`` (a data loader), plain data (ints, strings, lists, dicts, tensors inside
    them). A per-rank object with ``load_rank_state_dicts(states)`` gets every saved rank's state
    when the world size changed; others get the state of saved rank ``min(rank, old_world - 1)``.
    Every rank calls ``maybe_save`` at every step (one tiny all-reduce decides preemption).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        interval_steps: int | None = None,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        storage_options: dict[str, Any] | None = None,
        world: Any = None,
        signals: Iterable[int] | None = (signal.SIGTERM,),
        capture_rng: bool = True,
        grace_period_s: float | None = None,
        memory_interval_steps: int | None = None,
        memory_keep: int = 2,
        replicate: bool | str = "auto",
        replicate_bytes_per_s: float | None = None,
    ) -> None:
        from trainkit.dist import current_world
        from trainkit.world import World

        if interval_steps is not None and interval_steps < 1:
            raise ValueError(
                f"interval_steps ({interval_steps}) must be at least 1 (or None: save only on preemption)"
            )
        plan_retention([], [], keep_last=keep_last, keep_every=keep_every)  # validates the policy
        self.interval_steps = interval_steps
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.capture_rng = capture_rng
        self.store = CheckpointRoot(os.fspath(root), storage_options)
        self.world = world or current_world() or World.from_env()
        self.grace_period_s = (
            grace_period_s if grace_period_s is not None else read_grace_period_s()
        )
        self._groups = CheckpointGroups(self.world.world_size)
        # Writability is checked at the first save, not here: a pod restarted on a full (or
        # read-only) volume must still be able to restore its intact checkpoint.
        self._checked_writable = False
        self._pool = BufferPool()
        self._writer = StepWriter(
            self.store,
            world=self.world,
            groups=self._groups,
            pool=self._pool,
            on_commit=self._start_retention,
        )
        self._restorer = Restorer(
            self.store,
            world=self.world,
            groups=self._groups,
            pool=self._pool,
            capture_rng=capture_rng,
        )
        self._staging = HostStaging()
        self._thread: threading.Thread | None = None
        self._retention: threading.Thread | None = None
        self._in_flight: Snapshot | None = None
        self._error: BaseException | None = None
        self._should_stop = False
        self._last_save_s: float | None = None
        self._last_blocking_s: float | None = None
        self.last_save_time: float | None = None
        self._memory = (
            None
            if memory_interval_steps is None
            else MemoryCheckpoints(
                world=self.world,
                groups=self._groups,
                storage_url=self.store.url,
                interval_steps=memory_interval_steps,
                keep=memory_keep,
                replicate=replicate,
                capture_rng=capture_rng,
                rate_bytes_per_s=replicate_bytes_per_s,
            )
        )
        self._signal = PreemptionSignal(signals, timeout_s=self.grace_period_s)
        track_open_manager(self)

    # ----- public API -------------------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        """True after the agreed preemption save: exit with ``EXIT_PREEMPTED`` (see ``exit_preempted``)."""
        return self._should_stop

    @property
    def preemption_requested(self) -> bool:
        """True once a handled signal arrived in this process (before ranks agreed on it)."""
        return self._signal.requested

    def committed_steps(self) -> list[int]:
        """Steps with a commit record, ascending (records are not verified here; ``restore`` does)."""
        return scan_steps(self.store)[0]

    def request_preemption(self) -> None:
        """What the signal handler does: the next ``maybe_save`` agrees on a save and stop."""
        self._signal.request()

    def maybe_save(self, step: int, state: MutableMapping[str, Any]) -> bool:
        """Save on the interval, or (blocking) when any rank was signalled; every rank must call it.

        Returns True when a save was started or done at this step.
        """
        self._raise_background_error()
        if self._signal.requested:
            self._signal.answer()  # this loop calls maybe_save: no fallback to SIGTERM's default
        if self._groups.agree_any(self._signal.requested):
            self._settle_in_flight_for_preemption()
            note_agreed_preemption(step, committed=False)
            self.save(step, state, block=True)
            note_agreed_preemption(step, committed=True)
            self._should_stop = True
            logger.warning(
                "trainkit: preemption save of step %d committed; stop and exit %d",
                step,
                EXIT_PREEMPTED,
            )
            return True
        storage_due = self.interval_steps is not None and step % self.interval_steps == 0
        memory_due = self._memory is not None and (storage_due or self._memory.due(step))
        if memory_due:
            self._snapshot_to_memory(step, state)
        if storage_due:
            self.save(step, state)
        return storage_due or memory_due

    @property
    def memory(self) -> MemoryCheckpoints | None:
        """The memory tier (None without ``memory_interval_steps``)."""
        return self._memory

    def _snapshot_to_memory(self, step: int, state: MutableMapping[str, Any]) -> None:
        assert self._memory is not None
        snapshot = self._capture(step, state, copy_tensors=False, started=time.monotonic())
        self._memory.snapshot(step, snapshot.global_state, snapshot.rank_bytes)

    def save(self, step: int, state: MutableMapping[str, Any], *, block: bool = False) -> None:
        """Save ``state`` as ``step``; with ``async_save`` and not ``block``, return after the copy."""
        if step < 0:
            raise ValueError(f"step ({step}) must be 0 or more")
        self.wait()
        if not self._checked_writable:
            self.store.check_writable()
            self._checked_writable = True
        if self._already_committed(step):
            logger.info(
                "trainkit: step %d is already committed under %s; not saving it again",
                step,
                self.store.url,
            )
            return
        started = time.monotonic()
        background = self.async_save and not block
        snapshot = self._capture(step, state, copy_tensors=background, started=started)
        snapshot.blocking_s = time.monotonic() - started
        if not background:
            self._persist(snapshot)
            return
        snapshot.cancel = threading.Event()
        self._in_flight = snapshot
        self._thread = threading.Thread(
            target=self._persist_in_background,
            args=(snapshot,),
            name=f"trainkit-ckpt-save-{step}",
            daemon=True,
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed and old steps are deleted; raise its
        error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._in_flight = None
        self._join_retention()
        self._raise_background_error()

    def close(self) -> None:
        """Finish the in-flight save, put back the previous signal handlers; raises a pending error.

        After an agreed preemption the handlers stay: a second SIGTERM only sets the flag again.
        """
        try:
            self.wait()
        finally:
            self._join_retention()
            if self._memory is not None:
                self._memory.close()
            self._signal.restore(stopping=self._should_stop)
            untrack_manager(self)

    def exit_preempted(self) -> NoReturn:
        """After ``should_stop``: close this manager, leave the process group, exit 75."""
        exit_preempted(self)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def restore(self, state: MutableMapping[str, Any]) -> int | None:
        """Load the newest committed step that verifies into ``state``; return it, or None if none.

        A step whose record or files do not verify is skipped with a warning and the previous one
        is tried. A checkpoint that does not fit ``state`` raises ``CheckpointMismatchError``.
        """
        self.wait()
        if self._memory is not None:
            return self._memory.restore(
                state,
                storage_steps=self.committed_steps,
                restore_from_storage=self._restorer.restore_newest,
            )
        return self._restorer.restore_newest(state)

    # ----- preemption -------------------------------------------------------------------------

    def _settle_in_flight_for_preemption(self) -> None:
        """Finish the in-flight save if the grace period leaves room for it and the preemption save."""
        if self._thread is None:
            return
        signal_time = self._signal.request_time
        if self.grace_period_s is not None and signal_time is not None:
            reserve_s = self._last_save_s or 0.0
            deadline = signal_time + self.grace_period_s - reserve_s
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if (
                self._thread.is_alive()
                and self._in_flight is not None
                and self._in_flight.cancel is not None
            ):
                logger.warning(
                    "trainkit: abandoning the in-flight save of step %d (uncommitted) to leave the "
                    "grace period to the preemption save",
                    self._in_flight.step,
                )
                self._in_flight.cancel.set()
        self._thread.join()
        self._thread = None
        self._in_flight = None
        error, self._error = self._error, None
        if error is not None and not isinstance(error, AbandonedSave):
            # Not lost: reported here, and the preemption save that follows supersedes that step.
            logger.error(
                "trainkit: the in-flight save failed before the preemption save: %s", error
            )
            warnings.warn(
                f"trainkit: the in-flight save failed before the preemption save: {error}",
                stacklevel=3,
            )

    # ----- capture ----------------------------------------------------------------------------

    def _capture(
        self, step: int, state: MutableMapping[str, Any], *, copy_tensors: bool, started: float
    ) -> Snapshot:
        from trainkit.checkpoint.rank_state import capture_rng_state

        global_state, entries, _ = split_state(state, per_rank=True)
        if copy_tensors:
            global_state = self._staging.copy(global_state)
        rank_payload = {
            "format": 1,
            "rank": self.world.rank,
            "world_size": self.world.world_size,
            "entries": entries,
            "rng": capture_rng_state() if self.capture_rng else None,
        }
        return Snapshot(step, global_state, serialize_rank_state(rank_payload, step), started)

    # ----- persist ----------------------------------------------------------------------------

    def _persist_in_background(self, snapshot: Snapshot) -> None:
        try:
            self._persist(snapshot)
        except BaseException as error:
            self._error = error

    def _persist(self, snapshot: Snapshot) -> None:
        self._writer.write(snapshot)
        self._after_commit(snapshot.step, snapshot.blocking_s, time.monotonic() - snapshot.started)

    def _start_retention(self, step: int) -> None:
        # Deleting old steps (large unlinks) need not delay the save: it runs beside training.
        self._join_retention()
        self._retention = threading.Thread(
            target=self._apply_retention, args=(step,), name="trainkit-ckpt-retention", daemon=True
        )
        self._retention.start()

    def _join_retention(self) -> None:
        if self._retention is not None:
            self._retention.join()
            self._retention = None

    def _apply_retention(self, in_flight: int) -> None:
        try:
            self._remove_old_steps(in_flight)
        except Exception:
            logger.exception(
                "trainkit: retention after step %d failed (the step is committed)", in_flight
            )

    def _remove_old_steps(self, in_flight: int) -> None:
        # Steps whose record does not parse or verify are left alone: neither counted nor deleted.
        committed, partial, _not_understood = classify_steps(self.store)
        for step in plan_retention(
            committed,
            partial,
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            in_flight=[in_flight],
        ):
            step_dir = self.store.join(step_dir_name(step))
            if step in committed:
                # Drop the record first: a half-deleted step is then uncommitted, never corrupt-looking.
                self.store.remove_tree(f"{step_dir}/{COMMIT_NAME}")
            self.store.remove_tree(step_dir)

    def _after_commit(self, step: int, blocking_s: float, total_s: float) -> None:
        self._last_save_s = total_s
        self._last_blocking_s = blocking_s
        self.last_save_time = time.time()
        logger.info(
            "trainkit: step %d committed (blocked %.3f s, total %.3f s)", step, blocking_s, total_s
        )
        if self.grace_period_s is not None and total_s > self.grace_period_s:
            message = (
                f"trainkit: saving step {step} took {total_s:.1f} s, longer than the grace period "
                f"{GRACE_PERIOD_VARIABLE}={self.grace_period_s:g} s: a preemption save would be killed before "
                "it commits; raise terminationGracePeriodSeconds (and the variable) or use faster storage"
            )
            warnings.warn(message, stacklevel=3)
            logger.warning(message)
        try:
            from trainkit.metrics import observe_checkpoint  # type: ignore[attr-defined]
        except ImportError:
            return
        try:
            observe_checkpoint(blocking_s=blocking_s, total_s=total_s)
        except Exception:
            logger.exception("trainkit: recording checkpoint metrics failed")

    def _already_committed(self, step: int) -> bool:
        """True when ``step`` is committed and verifies; a committed step that does not verify is
        uncommitted and removed here, so the save that follows replaces it."""
        decides = self.world.is_main or not self._groups.distributed
        verdict = self._writer.existing_step_verdict(step) if decides else None
        verdict = self._groups.broadcast(verdict)
        if verdict not in {"committed", "absent"}:
            raise CheckpointSaveError(step, verdict)
        return verdict == "committed"

    def _raise_background_error(self) -> None:
        error, self._error = self._error, None
        if error is None or isinstance(error, AbandonedSave):
            return
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointSaveError(
            -1, f"background checkpoint save failed: {type(error).__name__}: {error}"
        ) from error
