"""Exit codes, the worker -> launcher exit record, and the launcher's decision from the records."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit import preemption
from trainkit.exit_codes import EXIT_PREEMPTED, describe_exit_code, record_worker_exit
from trainkit.preemption import ExitRecord, launcher_exit_code, read_exit_records


def test_preempted_code_is_distinct_from_shell_and_signal_codes() -> None:
    assert EXIT_PREEMPTED not in {0, 1, 2, 126, 127} and EXIT_PREEMPTED < 128
    assert describe_exit_code(EXIT_PREEMPTED) == "preempted, checkpoint committed"
    assert describe_exit_code(-9) == "killed by SIGKILL"
    assert describe_exit_code(143) == "exited after SIGTERM"
    assert describe_exit_code(3) == "exited with an error"


def test_worker_exit_is_recorded_by_rank(tmp_path: Path) -> None:
    record_worker_exit(EXIT_PREEMPTED, {"TRAINKIT_EXIT_STATUS_DIR": str(tmp_path), "RANK": "3"})
    assert read_exit_records(tmp_path) == {3: ExitRecord(EXIT_PREEMPTED)}
    assert [path.name for path in tmp_path.iterdir()] == ["rank-3"]


def test_without_a_launcher_nothing_is_written(tmp_path: Path) -> None:
    record_worker_exit(EXIT_PREEMPTED, {"RANK": "0"})
    record_worker_exit(
        EXIT_PREEMPTED, {"TRAINKIT_EXIT_STATUS_DIR": str(tmp_path / "gone"), "RANK": "0"}
    )
    assert list(tmp_path.iterdir()) == []


def agreed(step: int = 20, committed: bool = True) -> ExitRecord:
    return ExitRecord(EXIT_PREEMPTED, step=step, committed=committed)


def test_launcher_exits_preempted_only_for_an_agreed_committed_preemption() -> None:
    assert launcher_exit_code({0: 75, 1: 75}, 0, {0: agreed(), 1: agreed()}) == EXIT_PREEMPTED
    # One rank exiting 75 on its own (a crash, os._exit(75)) is a failure, not a preemption.
    assert launcher_exit_code({1: 75}, 1, {}) == 1
    assert launcher_exit_code({0: 75, 1: -9}, 0, {0: agreed()}) == 1
    assert launcher_exit_code({0: 75, 1: 75}, 0, {0: agreed(20), 1: agreed(30)}) == 1
    assert launcher_exit_code({0: 75}, 0, {0: agreed(committed=False)}) == 1
    assert launcher_exit_code({0: 75}, 0, {0: ExitRecord(EXIT_PREEMPTED)}) == 1


def test_exit_record_round_trip_and_old_plain_codes(tmp_path: Path) -> None:
    env = {"TRAINKIT_EXIT_STATUS_DIR": str(tmp_path), "RANK": "0"}
    record_worker_exit(EXIT_PREEMPTED, env, step=40, committed=True)
    (tmp_path / "rank-1").write_text("75")  # what older workers wrote
    (tmp_path / "rank-2").write_text("{not json")
    assert read_exit_records(tmp_path) == {0: agreed(40), 1: ExitRecord(EXIT_PREEMPTED)}


def test_exit_preempted_records_whether_the_agreed_save_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINKIT_EXIT_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(preemption, "_agreed_preemption", None)
    with pytest.raises(SystemExit) as exited:
        preemption.exit_preempted()
    assert exited.value.code == EXIT_PREEMPTED
    assert read_exit_records(tmp_path) == {0: ExitRecord(EXIT_PREEMPTED, None, False)}
    preemption.note_agreed_preemption(12, committed=True)
    with pytest.raises(SystemExit):
        preemption.exit_preempted()
    assert read_exit_records(tmp_path) == {0: agreed(12)}
