"""Steps that do not verify: a damaged one is replaced by the next save of its step, and retention
never counts or deletes a step whose record it cannot read (a newer format after a rollback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.trainkit.checkpoint.states import (
    assert_same_params,
    make_state,
    manager,
    params,
    rewrite_commit,
    train,
)
from trainkit.checkpoint import CheckpointSaveError, UnsupportedCheckpointError
from trainkit.checkpoint.commit import step_dir_name

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def flip_a_byte(step_dir: Path) -> None:
    data = step_dir / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def steps_on_disk(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith("step_"))


def test_preemption_save_replaces_a_damaged_step_of_the_same_number(tmp_path: Path) -> None:
    state = make_state()
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(10, state)
        train(state, 1)
        ckpt.save(20, state)
    flip_a_byte(tmp_path / step_dir_name(20))

    resumed = make_state(seed=4)
    ckpt = manager(tmp_path, async_save=False)
    with pytest.warns(UserWarning, match="skipping checkpoint step 20"):
        assert ckpt.restore(resumed) == 10
    train(resumed, 1)  # the job redoes step 20, then is preempted there
    ckpt.request_preemption()
    assert ckpt.maybe_save(20, resumed)
    assert ckpt.should_stop
    ckpt.close()

    fresh = make_state(seed=6)
    assert manager(tmp_path).restore(fresh) == 20  # no warning: step 20 verifies now
    assert_same_params(params(fresh), params(resumed))


def test_interval_save_keeps_a_verified_step_of_the_same_number(tmp_path: Path) -> None:
    state = make_state()
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(5, state)
        record = (tmp_path / step_dir_name(5) / "COMMIT.json").read_bytes()
        ckpt.save(5, make_state(seed=2))
    assert (tmp_path / step_dir_name(5) / "COMMIT.json").read_bytes() == record


def write_newer_format_step(root: Path, source: int, step: int) -> None:
    """A step as a newer trainkit (format 99) would leave it behind after a rollback."""
    shutil.copytree(root / step_dir_name(source), root / step_dir_name(step))

    def newer(record: dict) -> None:
        record["step"] = step
        record["format_version"] = 99

    rewrite_commit(root / step_dir_name(step), newer)


def test_retention_never_counts_or_deletes_a_step_it_cannot_read(tmp_path: Path) -> None:
    state = make_state()
    with manager(tmp_path, async_save=False, keep_last=2) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
        write_newer_format_step(tmp_path, source=2, step=3)
        ckpt.save(4, state)
        ckpt.save(5, state)
        ckpt.wait()
    assert steps_on_disk(tmp_path) == [step_dir_name(s) for s in (3, 4, 5)]
    assert manager(tmp_path).restore(make_state()) == 5


def test_restore_refuses_rather_than_starting_over_when_every_step_is_unreadable(
    tmp_path: Path,
) -> None:
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state())
    write_newer_format_step(tmp_path, source=1, step=2)
    shutil.rmtree(tmp_path / step_dir_name(1))
    with (
        pytest.warns(UserWarning, match="skipping checkpoint step 2"),
        pytest.raises(UnsupportedCheckpointError, match=r"format_version 99 .*upgrade trainkit"),
    ):
        manager(tmp_path).restore(make_state())
    with pytest.raises(CheckpointSaveError, match="format this trainkit does not understand"):
        manager(tmp_path, async_save=False).save(2, make_state())
    assert steps_on_disk(tmp_path) == [step_dir_name(2)]
