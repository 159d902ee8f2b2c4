"""The worker recorder: what one step writes, restarts reusing a slot, configuration from the env."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

import trainkit.metrics
from trainkit.metrics.recorder import (
    DisabledRecorder,
    Recorder,
    local_metrics_dir,
    recorder_from_env,
)
from trainkit.metrics.slots import (
    CHECKPOINT_BUCKETS_S,
    SLOT_BYTES,
    STEP_BUCKETS_S,
    Field,
    read_slots,
    slot_path,
)
from trainkit.world import World

WORLD = World(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1, num_nodes=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("trainkit.metrics.recorder._monotonic", fake)
    return fake


def fields(directory: Path, local_rank: int = 1) -> list[float]:
    (slot,) = [s for s in read_slots(directory) if s.local_rank == local_rank]
    return list(slot.values)


def test_steps_fill_counters_histogram_and_productive_time(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder(tmp_path, WORLD)
    recorder.step(8)  # first step after start: only starts the clock
    clock.now += 0.02
    recorder.step(8, tokens=100, loss=2.0)
    clock.now += 0.5
    recorder.observe_data_wait(0.1)
    recorder.observe_checkpoint(blocking_s=0.3, total_s=2.0)
    recorder.step(8, loss=1.5)
    values = fields(tmp_path)
    assert values[Field.SAMPLES] == 24
    assert values[Field.TOKENS] == 100
    assert values[Field.LOSS] == 1.5
    assert values[Field.STEP_SUM_S] == pytest.approx(0.52)
    buckets = values[Field.STEP_BUCKETS : Field.STEP_BUCKETS + len(STEP_BUCKETS_S) + 1]
    assert buckets[STEP_BUCKETS_S.index(0.025)] == 1  # 0.02 s lands in le=0.025
    assert buckets[STEP_BUCKETS_S.index(0.5)] == 1  # exactly 0.5 s lands in le=0.5
    assert sum(buckets) == 2
    # The second interval held 0.1 s of data wait and 0.3 s of checkpoint blocking.
    assert values[Field.PRODUCTIVE_S] == pytest.approx(0.02 + 0.1)
    assert values[Field.DATA_WAIT_S] == pytest.approx(0.1)
    assert values[Field.CKPT_BLOCKING_SUM_S] == pytest.approx(0.3)
    assert values[Field.STALL_S] == pytest.approx(0.4)
    assert values[Field.CKPT_TOTAL_SUM_S] == pytest.approx(2.0)
    ckpt = values[
        Field.CKPT_TOTAL_BUCKETS : Field.CKPT_TOTAL_BUCKETS + len(CHECKPOINT_BUCKETS_S) + 1
    ]
    assert ckpt[CHECKPOINT_BUCKETS_S.index(2.5)] == 1
    assert values[Field.LAST_STEP_MONOTONIC_S] == clock.now
    assert (values[Field.WORLD_SIZE], values[Field.LOCAL_RANK], values[Field.LOCAL_WORLD_SIZE]) == (
        4,
        1,
        2,
    )
    recorder.close()


def test_stall_longer_than_the_step_counts_no_productive_time(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder(tmp_path, WORLD)
    recorder.step(1)
    clock.now += 1.0
    # Reported late, by a checkpoint thread: more stall than the interval holds.
    recorder.observe_checkpoint(blocking_s=5.0, total_s=5.0)
    recorder.step(1)
    assert fields(tmp_path)[Field.PRODUCTIVE_S] == 0.0


def test_restarted_worker_keeps_counting_in_the_same_slot(tmp_path: Path, clock: FakeClock) -> None:
    first = Recorder(tmp_path, WORLD)
    first.step(10, loss=3.0)
    clock.now += 0.1
    first.step(10)
    created = fields(tmp_path)[Field.CREATED_UNIX_S]
    first.close()
    restarted = World(**{**WORLD.as_dict(), "restart_count": 1})
    second = Recorder(tmp_path, restarted)
    values = fields(tmp_path)
    # Counters carried over; per-incarnation values reset.
    assert values[Field.SAMPLES] == 20
    assert values[Field.STEP_SUM_S] == pytest.approx(0.1)
    assert math.isnan(values[Field.LOSS]) and math.isnan(values[Field.LAST_STEP_MONOTONIC_S])
    assert values[Field.RESTART_COUNT] == 1 and values[Field.PID] == os.getpid()
    assert values[Field.CREATED_UNIX_S] == created
    second.step(5)
    clock.now += 0.2
    second.step(5)
    values = fields(tmp_path)
    assert values[Field.SAMPLES] == 30 and values[Field.STEP_SUM_S] == pytest.approx(0.3)
    assert values[Field.PRODUCTIVE_S] == pytest.approx(0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local-rank-1.slot"]


def test_slot_of_another_layout_is_reset(tmp_path: Path) -> None:
    slot_path(tmp_path, 1).write_bytes(b"\x01" * 64)
    Recorder(tmp_path, WORLD).step(4)
    assert slot_path(tmp_path, 1).stat().st_size == SLOT_BYTES
    assert fields(tmp_path)[Field.SAMPLES] == 4


def test_no_configuration_means_disabled() -> None:
    assert isinstance(recorder_from_env({}), DisabledRecorder)
    assert isinstance(recorder_from_env({"TRAINKIT_METRICS_PORT": "0"}), DisabledRecorder)


def test_agent_directory_wins(tmp_path: Path) -> None:
    env = {"TRAINKIT_METRICS_DIR": str(tmp_path), "TRAINKIT_METRICS_PORT": "1"}
    recorder = recorder_from_env(env)
    assert isinstance(recorder, Recorder) and recorder.directory == tmp_path
    assert slot_path(tmp_path, 0).exists()


def test_vanished_agent_directory_disables_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone"
    assert isinstance(recorder_from_env({"TRAINKIT_METRICS_DIR": str(missing)}), DisabledRecorder)
    assert f"TRAINKIT_METRICS_DIR={missing} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("raw", ["http", "-1", "70000"])
def test_bad_port_is_named(raw: str) -> None:
    with pytest.raises(ValueError, match=f"TRAINKIT_METRICS_PORT='{raw}'"):
        recorder_from_env({"TRAINKIT_METRICS_PORT": raw})


def test_local_directory_is_per_port_and_run() -> None:
    assert local_metrics_dir(9400, "job/1") != local_metrics_dir(9401, "job/1")
    assert local_metrics_dir(9400, "job/1").name.endswith("-p9400-job_1")


def test_module_functions_configure_once_and_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainkit.metrics.reset()
    monkeypatch.setenv("TRAINKIT_METRICS_DIR", str(tmp_path))
    for name in (
        "TRAINKIT_METRICS_PORT",
        "TORCHELASTIC_RUN_ID",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
    ):
        monkeypatch.delenv(name, raising=False)
    try:
        trainkit.metrics.step(samples=16, tokens=32, loss=0.5)
        trainkit.metrics.observe_data_wait(0.25)
        trainkit.metrics.observe_checkpoint(0.5, 1.0)
        values = fields(tmp_path, local_rank=0)
        assert (
            values[Field.SAMPLES] == 16 and values[Field.TOKENS] == 32 and values[Field.LOSS] == 0.5
        )
        assert values[Field.DATA_WAIT_S] == 0.25 and values[Field.CKPT_BLOCKING_COUNT] == 1
        assert trainkit.metrics.configure() is trainkit.metrics.configure()
    finally:
        trainkit.metrics.reset()
    monkeypatch.delenv("TRAINKIT_METRICS_DIR")
    try:
        assert not trainkit.metrics.configure().enabled
        trainkit.metrics.step(samples=1)  # a no-op
    finally:
        trainkit.metrics.reset()


def test_import_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = (
        "import sys, threading, trainkit.metrics; "
        "assert 'prometheus_client' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules); "
        "assert threading.active_count() == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda r: r.step(-8), "step(samples=-8)"),
        (lambda r: r.step(8, tokens=-1), "step(tokens=-1)"),
        (lambda r: r.step(float("nan")), "step(samples=nan)"),
        (lambda r: r.observe_data_wait(-0.5), "observe_data_wait(seconds=-0.5)"),
        (lambda r: r.observe_checkpoint(1.0, -2.0), "observe_checkpoint(total_s=-2.0)"),
    ],
)
def test_negative_counter_increments_are_refused(tmp_path: Path, call: object, named: str) -> None:
    recorder = Recorder(tmp_path, WORLD)
    recorder.step(4)
    before = slot_path(tmp_path, 1).read_bytes()
    for target in (recorder, DisabledRecorder()):
        with pytest.raises(ValueError, match=re.escape(named) + ".*>= 0"):
            call(target)  # type: ignore[operator]
    assert slot_path(tmp_path, 1).read_bytes() == before  # nothing half-recorded
    recorder.close()
