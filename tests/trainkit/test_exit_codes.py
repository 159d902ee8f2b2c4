"""Exit codes and the worker -> launcher exit report."""

from __future__ import annotations

from pathlib import Path

from trainkit.exit_codes import EXIT_PREEMPTED, describe_exit_code, record_worker_exit
from trainkit.preemption import ExitRecord, read_exit_records


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
