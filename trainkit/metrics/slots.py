"""The worker -> agent channel: one fixed-size file of float64 fields per local rank ("slot").

A worker maps its slot and updates it in place; the agent reads all slots on each scrape. Slots are
named by local rank, not pid, so restarted workers reuse (and keep counting in) the same file.
This module never starts threads or servers and never reads the environment.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
from array import array
from dataclasses import dataclass
from pathlib import Path

from trainkit.metrics.directories import process_alive

__all__ = [
    "CHECKPOINT_BUCKETS_S",
    "LAYOUT_VERSION",
    "SLOT_BYTES",
    "STEP_BUCKETS_S",
    "TIER_OPERATIONS",
    "Field",
    "SlotScan",
    "SlotSnapshot",
    "open_slot",
    "read_slots",
    "scan_slots",
    "slot_path",
]

LAYOUT_VERSION = 1.0

#: Upper bounds (le) of the step-duration histogram, in seconds; +Inf is implicit.
STEP_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Upper bounds (le) of the checkpoint blocking and total duration histograms, in seconds.
CHECKPOINT_BUCKETS_S: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)


#: (tier, operation) pairs of the memory-first checkpoint tiers, in slot order; each has a count,
#: a bytes total and a seconds total.
TIER_OPERATIONS: tuple[tuple[str, str], ...] = (
    ("memory", "save"),
    ("peer", "save"),
    ("peer", "fetch"),
    ("memory", "restore"),
    ("peer", "restore"),
    ("storage", "restore"),
)


class Field:
    """Index of each float64 in a slot. Histograms store per-bucket (not cumulative) counts."""

    VERSION = 0  # LAYOUT_VERSION once the slot is initialised
    PID = 1  # the worker incarnation that owns the slot now
    RESTART_COUNT = 2  # TORCHELASTIC_RESTART_COUNT of that incarnation
    WORLD_SIZE = 3
    LOCAL_RANK = 4
    LOCAL_WORLD_SIZE = 5
    CREATED_UNIX_S = 6  # when the slot was first created (first incarnation)
    STARTED_UNIX_S = 7  # when the current incarnation opened it
    SAMPLES = 8
    TOKENS = 9
    LOSS = 10  # NaN until the current incarnation reports one
    LAST_STEP_MONOTONIC_S = 11  # CLOCK_MONOTONIC (shared by all processes of the host); NaN before
    DATA_WAIT_S = 12
    PRODUCTIVE_S = 13
    STEP_SUM_S = 14
    STALL_S = 15  # data wait + checkpoint blocking: the one total step() reads to find lost time
    STEP_BUCKETS = 16
    CKPT_BLOCKING_SUM_S = STEP_BUCKETS + len(STEP_BUCKETS_S) + 1
    CKPT_BLOCKING_COUNT = CKPT_BLOCKING_SUM_S + 1
    CKPT_BLOCKING_BUCKETS = CKPT_BLOCKING_COUNT + 1
    CKPT_TOTAL_SUM_S = CKPT_BLOCKING_BUCKETS + len(CHECKPOINT_BUCKETS_S) + 1
    CKPT_TOTAL_COUNT = CKPT_TOTAL_SUM_S + 1
    CKPT_TOTAL_BUCKETS = CKPT_TOTAL_COUNT + 1
    REPLICATION_LAG_STEPS = CKPT_TOTAL_BUCKETS + len(CHECKPOINT_BUCKETS_S) + 1
    TIER_FIELDS = REPLICATION_LAG_STEPS + 1  # count, bytes, seconds per TIER_OPERATIONS entry
    END = TIER_FIELDS + 3 * len(TIER_OPERATIONS)


SLOT_FIELDS = Field.END
SLOT_BYTES = SLOT_FIELDS * 8

# Reset when a new incarnation takes a slot; everything else (counters, histograms) carries over.
_PER_INCARNATION = (Field.LOSS, Field.LAST_STEP_MONOTONIC_S)
# What a valid slot holds: whole numbers >= 0 that say who wrote it, and finite amounts >= 0 that
# only grow (counters, histogram sums and buckets). Loss and the last-step stamp may be NaN.
_WHOLE_NUMBERS = (
    Field.PID,
    Field.RESTART_COUNT,
    Field.WORLD_SIZE,
    Field.LOCAL_RANK,
    Field.LOCAL_WORLD_SIZE,
)
_GROWING = (
    Field.SAMPLES,
    Field.TOKENS,
    Field.DATA_WAIT_S,
    Field.PRODUCTIVE_S,
    *range(Field.STEP_SUM_S, Field.END),
)


def slot_path(directory: str | os.PathLike[str], local_rank: int) -> Path:
    return Path(directory) / f"local-rank-{local_rank}.slot"


def open_slot(
    directory: str | os.PathLike[str],
    *,
    local_rank: int,
    local_world_size: int,
    world_size: int,
    restart_count: int,
    now_unix_s: float,
) -> tuple[mmap.mmap, memoryview]:
    """Map this worker's slot, creating it or taking it over from a previous incarnation.

    Counters and histograms already in the file are kept, so a restarted worker keeps counting
    where its predecessor stopped and the pod's ``_total`` series never go backwards. Returns the
    mapping (keep it alive) and a float64 view of it.
    """
    path = slot_path(directory, local_rank)
    # O_NOFOLLOW: a symlink planted under the slot's name must not redirect these writes.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(
                f"metrics slot {path} is not a regular file; remove it and restart the worker"
            )
        fresh = info.st_size != SLOT_BYTES
        if fresh:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, SLOT_BYTES)
        mapping = mmap.mmap(fd, SLOT_BYTES)
    finally:
        os.close(fd)
    fields = memoryview(mapping).cast("d")
    if fresh or fields[Field.VERSION] != LAYOUT_VERSION:
        for index in range(SLOT_FIELDS):
            fields[index] = 0.0
        fields[Field.CREATED_UNIX_S] = now_unix_s
    for index in _PER_INCARNATION:
        fields[index] = math.nan
    fields[Field.PID] = os.getpid()
    fields[Field.RESTART_COUNT] = restart_count
    fields[Field.WORLD_SIZE] = world_size
    fields[Field.LOCAL_RANK] = local_rank
    fields[Field.LOCAL_WORLD_SIZE] = local_world_size
    fields[Field.STARTED_UNIX_S] = now_unix_s
    fields[Field.VERSION] = LAYOUT_VERSION  # last: readers skip slots that are not ready yet
    return mapping, fields


@dataclass(frozen=True)
class SlotSnapshot:
    """One slot as read by the agent; ``alive`` says whether its owning process still runs."""

    local_rank: int
    values: array
    alive: bool

    def __getitem__(self, index: int) -> float:
        return self.values[index]


@dataclass(frozen=True)
class SlotScan:
    """What one pass over a slot directory found: usable slots, and slots that were skipped
    because their contents are invalid (``bad``: each path with what is wrong with it)."""

    slots: list[SlotSnapshot]
    bad: list[tuple[Path, str]]


def _problem(values: array, path: Path) -> str | None:
    for index in _WHOLE_NUMBERS:
        value = values[index]
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            return f"field {index} is {value!r}, expected a whole number >= 0"
    for index in _GROWING:
        value = values[index]
        if not (math.isfinite(value) and value >= 0):
            return f"field {index} is {value!r}, expected a finite amount >= 0"
    if path != slot_path(path.parent, int(values[Field.LOCAL_RANK])):
        return f"local rank {int(values[Field.LOCAL_RANK])} does not match the file name"
    return None


def scan_slots(directory: str | os.PathLike[str]) -> SlotScan:
    """Copy every initialised slot in ``directory`` (sorted by local rank); missing dir -> empty.

    A slot that is not initialised yet (or is being re-created) is left out silently; one whose
    contents are invalid (a NaN rank, a negative counter) is left out and listed in ``bad``, so
    one broken file never takes the pod's other series down with it.
    """
    snapshots, bad = [], []
    try:
        entries = sorted(Path(directory).glob("local-rank-*.slot"))
    except OSError:
        return SlotScan([], [])
    for path in entries:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed between listing and reading
        if len(data) != SLOT_BYTES:
            continue
        values = array("d")
        values.frombytes(data)
        if values[Field.VERSION] != LAYOUT_VERSION:
            continue
        problem = _problem(values, path)
        if problem is not None:
            bad.append((path, problem))
            continue
        snapshots.append(
            SlotSnapshot(
                local_rank=int(values[Field.LOCAL_RANK]),
                values=values,
                alive=process_alive(int(values[Field.PID])),
            )
        )
    return SlotScan(snapshots, bad)


def read_slots(directory: str | os.PathLike[str]) -> list[SlotSnapshot]:
    """The usable slots of ``scan_slots(directory)``."""
    return scan_slots(directory).slots
