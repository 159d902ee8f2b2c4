"""trainkit-run's metrics directory does not outlive the launcher: not after two quick SIGTERMs,
and not after a SIGKILL (the next exporter removes what the killed one left)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.trainkit.metrics.jobs import (
    TRAINKIT_RUN,
    job_env,
    kill_job,
    parse_exposition,
    start_job,
    value,
    wait_until,
)
from tests.trainkit.metrics.prometheus_server import free_port, scrape
from trainkit.metrics.directories import process_alive
from trainkit.metrics.exporter import start_agent_exporter
from trainkit.metrics.slots import Field, read_slots

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def start_stepping_job(outdir: Path) -> tuple[subprocess.Popen[str], Path]:
    """A trainkit-run job with metrics whose worker is stepping; returns it and its slot directory."""
    port = free_port()
    env = job_env(TRAINKIT_METRICS_HOST="127.0.0.1")
    args = ["--standalone", "--nproc-per-node", "1", "--metrics-port", str(port)]
    process = start_job(TRAINKIT_RUN, args, outdir, env)
    log = outdir / "launcher.log"

    def stepping() -> bool:
        try:
            samples = parse_exposition(scrape(port))
        except OSError:
            return False
        return (value(samples, "trainkit_samples_total") or 0) > 0

    wait_until(stepping, 90, "the worker to record steps", log)
    # The job script writes the TRAINKIT_METRICS_DIR it got from the launcher.
    directory = Path((outdir / "env-0-0.txt").read_text())
    assert directory.is_dir()
    return process, directory


def test_two_quick_sigterms_leave_no_metrics_directory(tmp_path: Path) -> None:
    process, directory = start_stepping_job(tmp_path)
    try:
        os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.05)
        os.kill(process.pid, signal.SIGTERM)
        returncode = process.wait(timeout=60)
        log = (tmp_path / "launcher.log").read_text()[-3000:]
        assert not directory.exists(), f"{directory} outlived the launcher\n{log}"
        assert returncode == 128 + signal.SIGTERM and "Traceback" not in log, log
    finally:
        kill_job(process)


def test_a_sigkilled_launchers_directory_is_removed_by_the_next_exporter(tmp_path: Path) -> None:
    process, directory = start_stepping_job(tmp_path)
    # torch starts workers in their own session, out of reach of the launcher's process group.
    worker_pids = [int(slot[Field.PID]) for slot in read_slots(directory)]
    assert worker_pids
    try:
        kill_job(process)  # SIGKILL: the launcher gets no chance to clean up
        for pid in worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: not any(process_alive(pid) for pid in worker_pids), 30, "the workers to die"
        )
        assert directory.is_dir()
        with start_agent_exporter(0, addr="127.0.0.1", env={}) as exporter:
            assert exporter.directory != directory
            assert not directory.exists(), "a dead launcher's directory survived a new exporter"
    finally:
        for pid in worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
