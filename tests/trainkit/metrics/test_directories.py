"""Slot directories: never used when another user could control them; stale ones removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainkit.metrics.directories import (
    UnsafeMetricsDirectoryError,
    create_agent_directory,
    local_metrics_dir,
    make_private_directory,
    remove_other_runs,
)
from trainkit.metrics.recorder import recorder_from_env
from trainkit.metrics.slots import open_slot

OTHER_UID = 65534  # nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def local_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The predictable no-launcher directory of a run unique to this test, removed afterwards."""
    run_id = f"unsafe-dir-test-{os.getpid()}-{request.node.name}"
    directory = local_metrics_dir(9, run_id)
    yield directory
    if directory.is_symlink():
        directory.unlink()
    shutil.rmtree(directory, ignore_errors=True)


def worker_env(directory: Path) -> dict[str, str]:
    # Local rank 1: records into the directory but does not serve (no port is bound).
    run_id = directory.name.split("-p9-", 1)[1]
    return {
        "TRAINKIT_METRICS_PORT": "9",
        "TORCHELASTIC_RUN_ID": run_id,
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }


@needs_root
def test_premade_directory_of_another_user_with_a_symlinked_slot_is_refused(
    local_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    local_dir.mkdir(mode=0o755)
    (local_dir / "local-rank-1.slot").symlink_to(victim)
    os.chown(local_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeMetricsDirectoryError, match=f"owned by uid {OTHER_UID}.*Remove it"):
        recorder_from_env(worker_env(local_dir))
    assert victim.read_text() == "precious"


def test_group_or_world_writable_directory_is_refused(local_dir: Path) -> None:
    local_dir.mkdir()
    local_dir.chmod(0o777)
    with pytest.raises(UnsafeMetricsDirectoryError, match="writable by group or others"):
        recorder_from_env(worker_env(local_dir))
    assert list(local_dir.iterdir()) == []


def test_symlinked_directory_is_refused(local_dir: Path, tmp_path: Path) -> None:
    local_dir.symlink_to(tmp_path)
    with pytest.raises(UnsafeMetricsDirectoryError, match="is a symbolic link"):
        recorder_from_env(worker_env(local_dir))
    assert list(tmp_path.iterdir()) == []


def test_new_directory_is_private(local_dir: Path) -> None:
    recorder = recorder_from_env(worker_env(local_dir))
    try:
        assert local_dir.stat().st_mode & 0o777 == 0o700
        assert (local_dir / "local-rank-1.slot").stat().st_mode & 0o777 == 0o600
    finally:
        recorder.close()
    make_private_directory(local_dir)  # an existing private directory of ours is reused


def test_symlinked_slot_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    directory = tmp_path / "slots"
    directory.mkdir(mode=0o700)
    (directory / "local-rank-0.slot").symlink_to(victim)
    with pytest.raises(OSError):
        open_slot(
            directory, local_rank=0, local_world_size=1, world_size=1, restart_count=0, now_unix_s=0
        )
    assert victim.read_text() == "precious"


def finished_process() -> tuple[int, int]:
    """(pid, start ticks) of a process that has exited."""
    code = "import os; print(os.getpid(), open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pid, ticks = out.stdout.split()
    return int(pid), int(ticks)


def own_start_ticks() -> int:
    return int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stale_agent_directories_are_removed_at_start(tmp_path: Path) -> None:
    uid = os.geteuid()
    dead_pid, dead_ticks = finished_process()
    stale = tmp_path / f"trainkit-metrics-agent-u{uid}-pid{dead_pid}-t{dead_ticks}-abc"
    # Same pid as a live process but another start time: a restarted container reusing the pid.
    reused = tmp_path / f"trainkit-metrics-agent-u{uid}-pid{os.getpid()}-t{own_start_ticks() + 1}-d"
    live = tmp_path / f"trainkit-metrics-agent-u{uid}-pid{os.getpid()}-t{own_start_ticks()}-e"
    unrelated = tmp_path / "trainkit-metrics-someone-p9400-run"
    for directory in (stale, reused, live, unrelated):
        directory.mkdir()
        (directory / "local-rank-0.slot").write_bytes(b"x")
    fresh = create_agent_directory(tmp_path)
    assert fresh.name.startswith(f"trainkit-metrics-agent-u{uid}-pid{os.getpid()}-t")
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [fresh.name, live.name, unrelated.name]
    )


@needs_root
def test_other_users_directories_are_never_removed(tmp_path: Path) -> None:
    dead_pid, dead_ticks = finished_process()
    # Named as if it were ours, but owned by someone else: not ours to delete.
    theirs = tmp_path / f"trainkit-metrics-agent-u{os.geteuid()}-pid{dead_pid}-t{dead_ticks}-x"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    other_run = tmp_path / "trainkit-metrics-me-p9400-old"
    other_run.mkdir()
    os.chown(other_run, OTHER_UID, OTHER_UID)
    mine = tmp_path / "trainkit-metrics-me-p9400-older"
    mine.mkdir()
    create_agent_directory(tmp_path)
    assert remove_other_runs(tmp_path / "trainkit-metrics-me-p9400-new") == [mine]
    assert theirs.is_dir() and other_run.is_dir()
