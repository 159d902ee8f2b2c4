"""CheckpointManager in one process: round trip, async errors, fallback, mismatch, safety, preemption."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.trainkit.checkpoint.states import (
    assert_same_params,
    make_state,
    manager,
    params,
    rewrite_commit,
    train,
)
from trainkit.checkpoint import (
    EXIT_PREEMPTED,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotWritableError,
    CheckpointSaveError,
)
from trainkit.checkpoint.commit import COMMIT_NAME, CommitRecord, step_dir_name
from trainkit.exit_codes import EXIT_PREEMPTED as SHARED_EXIT_PREEMPTED

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def test_exit_code_is_the_shared_one() -> None:
    assert EXIT_PREEMPTED == SHARED_EXIT_PREEMPTED == 75


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_restores_model_optimizer_rng_and_per_rank_state(
    tmp_path: Path, async_save: bool
) -> None:
    state = make_state()
    train(state, 3)
    state["extras"] = {"epoch": 2, "seen": [1, 2]}
    with manager(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.restore(state) is None
        ckpt.save(3, state)
        ckpt.wait()
        saved = params(state)
        saved_optim = {k: v.clone() for k, v in state["optim"].state_dict()["state"][0].items()}
        expected_draws = (
            torch.rand(4),
            np.random.rand(),
            random.random(),
            torch.rand(4, generator=state["data_rng"]),
        )
        train(state, 2)
    fresh = make_state(seed=1)
    with manager(tmp_path) as ckpt:
        assert ckpt.restore(fresh) == 3
    assert_same_params(params(fresh), saved)
    for key, value in fresh["optim"].state_dict()["state"][0].items():
        assert torch.equal(value, saved_optim[key]), key
    assert fresh["loader"].position == 24
    assert fresh["extras"] == {"epoch": 2, "seen": [1, 2]}
    assert torch.equal(torch.rand(4), expected_draws[0])
    assert np.random.rand() == expected_draws[1]
    assert random.random() == expected_draws[2]
    assert torch.equal(torch.rand(4, generator=fresh["data_rng"]), expected_draws[3])


def test_async_save_snapshot_is_taken_before_training_continues(tmp_path: Path) -> None:
    state = make_state()
    train(state, 1)
    with manager(tmp_path) as ckpt:
        ckpt.save(1, state)
        saved = params(state)
        train(state, 3)  # changes parameters while the writer may still run
        ckpt.wait()
    fresh = make_state(seed=5)
    assert manager(tmp_path).restore(fresh) == 1
    assert_same_params(params(fresh), saved)


def test_background_error_surfaces_at_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = make_state()
    ckpt = manager(tmp_path)
    from trainkit.checkpoint import store as store_module

    def broken(self, view):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.BlockWriter, "_write_out", broken)
    ckpt.save(1, state)
    with pytest.raises(
        CheckpointSaveError, match=r"step 1 .*not committed.*No space left on device"
    ):
        ckpt.wait()
    monkeypatch.undo()
    ckpt.save(2, state)
    ckpt.close()
    assert ckpt.committed_steps() == [2]


def test_error_also_surfaces_at_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainkit.checkpoint import store as store_module

    monkeypatch.setattr(store_module.BlockWriter, "_write_out", lambda self, view: 1 / 0)
    ckpt = manager(tmp_path)
    ckpt.save(1, make_state())
    with pytest.raises(CheckpointSaveError, match="ZeroDivisionError"):
        ckpt.close()


def corrupt_data_file(step_dir: Path) -> None:
    data = step_dir / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage",
    [
        corrupt_data_file,
        lambda d: (d / "__0_0.distcp").unlink(),
        lambda d: (d / "rank_00000.pt").write_bytes(b"x"),
        lambda d: (d / COMMIT_NAME).write_text('{"record": {"step": 2}, "record_crc32": 1}'),
        lambda d: (d / COMMIT_NAME).write_text((d / COMMIT_NAME).read_text()[:40]),
    ],
    ids=[
        "flipped-byte",
        "missing-file",
        "truncated-rank-file",
        "bad-record-checksum",
        "torn-record",
    ],
)
def test_damaged_newest_step_falls_back_with_warning(tmp_path: Path, damage) -> None:
    state = make_state()
    with manager(tmp_path, async_save=False) as ckpt:
        train(state, 1)
        ckpt.save(1, state)
        first = params(state)
        train(state, 1)
        ckpt.save(2, state)
    damage(tmp_path / step_dir_name(2))
    fresh = make_state(seed=3)
    with pytest.warns(UserWarning, match="skipping checkpoint step 2"):
        assert manager(tmp_path).restore(fresh) == 1
    assert_same_params(params(fresh), first)


def test_uncommitted_step_is_invisible_and_cleaned(tmp_path: Path) -> None:
    state = make_state()
    with manager(tmp_path, async_save=False, keep_last=1) as ckpt:
        ckpt.save(1, state)
        (tmp_path / step_dir_name(2)).mkdir()
        (tmp_path / step_dir_name(2) / "__0_0.distcp").write_bytes(b"half")
        assert ckpt.committed_steps() == [1]
        assert ckpt.restore(make_state(seed=2)) == 1
        ckpt.save(3, state)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        step_dir_name(3)
    ]


def test_save_of_a_committed_step_is_skipped(tmp_path: Path) -> None:
    state = make_state()
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        record = (tmp_path / step_dir_name(1) / COMMIT_NAME).read_bytes()
        train(state, 1)
        ckpt.save(1, state)
    assert (tmp_path / step_dir_name(1) / COMMIT_NAME).read_bytes() == record


def test_other_model_is_a_clear_error_naming_step_and_key(tmp_path: Path) -> None:
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(7, make_state())
    wider = make_state(hidden=64)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"step 7.*'model\.0\.weight' has shape \(32, 16\).*\(64, 16\)",
    ):
        manager(tmp_path).restore(wider)
    deeper = make_state()
    deeper["model"] = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.Linear(4, 4))
    deeper["optim"] = torch.optim.AdamW(deeper["model"].parameters())
    with pytest.raises(
        CheckpointMismatchError, match=r"step 7.*missing from the checkpoint: model\.3\.bias"
    ):
        manager(tmp_path).restore(deeper)
    shallower = make_state()
    shallower["model"] = nn.Sequential(nn.Linear(16, 32))
    shallower["optim"] = torch.optim.AdamW(shallower["model"].parameters())
    with pytest.raises(
        CheckpointMismatchError, match=r"step 7.*unexpected in the checkpoint: model\.2\.bias"
    ):
        manager(tmp_path).restore(shallower)
    extra = make_state()
    extra["scheduler_state"] = {"last": 1}
    with pytest.raises(
        CheckpointMismatchError,
        match=r"step 7: state entry 'scheduler_state' is not in the checkpoint",
    ):
        manager(tmp_path).restore(extra)


def test_root_that_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    unwritable = manager(blocker / "ckpt")  # restoring needs no write access
    assert unwritable.restore(make_state()) is None
    with pytest.raises(
        CheckpointNotWritableError, match=rf"{blocker}/ckpt is not writable .*writable directory"
    ):
        unwritable.save(1, make_state())
    if os.geteuid() != 0:
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o500)
        with pytest.raises(CheckpointNotWritableError, match="is not writable"):
            manager(readonly).save(1, make_state())


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rank_00000.pt", r"rank_00000\.pt: refused to load \(Weights only load failed"),
        (".metadata", r"\.metadata: metadata refused \(not JSON"),
    ],
)
def test_checkpoint_never_unpickles_arbitrary_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    with pytest.raises(ValueError, match="per-rank state cannot be saved safely"):
        manager(tmp_path / "other").save(1, {**make_state(), "extras": Boom()})
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state())
        ckpt.save(2, make_state())
    step_dir = tmp_path / step_dir_name(2)
    # A file carrying a code-running pickle, re-sealed in the commit record as an attacker would.
    evil = io.BytesIO()
    if name == ".metadata":
        pickle.dump(Boom(), evil)
    else:
        torch.save({"entries": Boom()}, evil)
    (step_dir / name).write_bytes(evil.getvalue())

    def reseal(record: dict) -> None:
        data = (step_dir / name).read_bytes()
        record["files"][name] = {
            **record["files"][name],
            "size": len(data),
            "checksum": "crc32",
            "block_checksums": [zlib.crc32(data)],
        }

    rewrite_commit(step_dir, reseal)
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.warns(UserWarning, match="step 2: .*" + message):
        assert manager(tmp_path).restore(make_state()) == 1
    assert calls == []


def test_sigterm_then_agreed_save_and_stop(tmp_path: Path) -> None:
    state = make_state()
    ckpt = CheckpointManager(tmp_path, interval_steps=100)
    try:
        assert not ckpt.maybe_save(1, state)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets a flag only
        assert ckpt.preemption_requested and not ckpt.should_stop
        train(state, 1)
        saved = params(state)
        assert ckpt.maybe_save(2, state)
        assert ckpt.should_stop
        assert ckpt.committed_steps() == [2]  # blocking: committed when maybe_save returns
    finally:
        ckpt.close()
    assert signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        signal.default_int_handler,
        None,
    ) or callable(signal.getsignal(signal.SIGTERM))
    fresh = make_state(seed=9)
    assert manager(tmp_path).restore(fresh) == 2
    assert_same_params(params(fresh), saved)


def test_interval_saves(tmp_path: Path) -> None:
    state = make_state()
    with manager(tmp_path, interval_steps=2, keep_last=2, keep_every=4) as ckpt:
        for step in range(1, 9):
            assert ckpt.maybe_save(step, state) == (step % 2 == 0)
        ckpt.wait()
        assert ckpt.committed_steps() == [4, 6, 8]


def test_warns_when_a_save_cannot_fit_in_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINKIT_GRACE_PERIOD_S", "0")
    with (
        pytest.warns(UserWarning, match="longer than the grace period TRAINKIT_GRACE_PERIOD_S=0 s"),
        manager(tmp_path, async_save=False) as ckpt,
    ):
        ckpt.save(1, make_state())
    monkeypatch.setenv("TRAINKIT_GRACE_PERIOD_S", "soon")
    with pytest.raises(ValueError, match="TRAINKIT_GRACE_PERIOD_S='soon' is not a number"):
        manager(tmp_path)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"interval_steps \(0\)"):
        CheckpointManager("/tmp/unused", interval_steps=0)
    with pytest.raises(ValueError, match=r"keep_last \(0\)"):
        CheckpointManager("/tmp/unused", keep_last=0)


def test_commit_record_round_trip_and_self_check() -> None:
    from trainkit.checkpoint.errors import CorruptCheckpointError
    from trainkit.checkpoint.store import FileInfo

    record = CommitRecord(
        step=5, world_size=2, files={"a": FileInfo(10, [1], checksum="crc32")}, created_unix_s=1.0
    )
    assert CommitRecord.decode(record.encode(), where="x", step=5) == record
    with pytest.raises(CorruptCheckpointError, match="lies in the directory of step 6"):
        CommitRecord.decode(record.encode(), where="x", step=6)
    tampered = record.encode().replace(b'"world_size": 2', b'"world_size": 3')
    with pytest.raises(CorruptCheckpointError, match="record checksum mismatch"):
        CommitRecord.decode(tampered, where="x", step=5)


def test_in_flight_save_is_abandoned_when_the_grace_period_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from trainkit.checkpoint import store as store_module

    original = store_module.BlockWriter._write_out

    def stuck_until_abandoned(self, view):
        # The in-flight save's data file sits on a slow disk that frees up only once the manager
        # has given the save up. A manager that waited for it instead would wait out the whole
        # deadline below, and step 1 would then commit: the assertions catch that, with no timer.
        if "step_0000000001" in self.path and self._cancel is not None:
            deadline = time.monotonic() + 60
            while not self._cancel.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        return original(self, view)

    monkeypatch.setattr(store_module.BlockWriter, "_write_out", stuck_until_abandoned)
    state = make_state()
    ckpt = manager(tmp_path, grace_period_s=0.5)
    ckpt.save(1, state)
    ckpt.request_preemption()
    assert ckpt.maybe_save(2, state)
    assert ckpt.should_stop
    ckpt.close()
    assert ckpt.committed_steps() == [2]  # step 1 was abandoned uncommitted, never visible


def test_in_flight_save_is_finished_when_the_grace_period_allows(tmp_path: Path) -> None:
    state = make_state()
    ckpt = manager(tmp_path, grace_period_s=60)
    ckpt.save(1, state)
    ckpt.request_preemption()
    assert ckpt.maybe_save(2, state)
    ckpt.close()
    assert ckpt.committed_steps() == [1, 2]
