"""Worker restarts under torchrun keep the pod's series and slot files fixed and counters monotonic.

Two ways to serve the pod endpoint: the agent exporter (what trainkit-run does, started here in the
test process around plain torchrun) and local rank 0 serving it when there is no trainkit-run.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.trainkit.metrics.jobs import (
    TORCHRUN,
    job_env,
    kill_job,
    parse_exposition,
    start_job,
    stop_job,
    value,
    wait_until,
)
from tests.trainkit.metrics.prometheus_server import free_port, scrape
from trainkit.metrics.exporter import start_agent_exporter
from trainkit.metrics.recorder import local_metrics_dir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

TORCHRUN_ARGS = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]


def _scrape_or_none(port: int) -> dict[str, float] | None:
    try:
        return parse_exposition(scrape(port))
    except OSError:
        return None  # between worker incarnations when local rank 0 serves


def _check_restart(port: int, outdir: Path, slot_dir: Callable[[], Path | None]) -> None:
    """Scrape through restart 0 -> 1; series identical, samples never go back, 2 slot files."""
    log = outdir / "launcher.log"
    history: list[float] = []

    def scrape_step(
        require: Callable[[dict[str, float]], bool],
    ) -> Callable[[], dict[str, float] | None]:
        def attempt() -> dict[str, float] | None:
            samples = _scrape_or_none(port)
            if samples is None:
                return None
            current = value(samples, "trainkit_samples_total")
            if current is not None:
                history.append(current)
            directory = slot_dir()
            if directory is not None and directory.exists():
                assert sorted(p.name for p in directory.iterdir()) in (
                    [],
                    ["local-rank-0.slot"],
                    ["local-rank-1.slot"],
                    ["local-rank-0.slot", "local-rank-1.slot"],
                ), sorted(directory.iterdir())
            return samples if require(samples) else None

        return attempt

    def steady(restarts: float) -> Callable[[dict[str, float]], bool]:
        return lambda s: (
            value(s, "trainkit_worker_restarts_total") == restarts
            and value(s, "trainkit_local_workers") == 2
            and value(s, "trainkit_loss") is not None
            and (value(s, "trainkit_samples_total") or 0) > 0
        )

    before = wait_until(scrape_step(steady(0)), 60, "two stepping workers before the restart", log)
    after = wait_until(scrape_step(steady(1)), 60, "two stepping workers after the restart", log)
    assert set(before) == set(after), (
        f"series changed across a worker restart: added {set(after) - set(before)}, "
        f"removed {set(before) - set(after)}"
    )
    assert all(b >= a for a, b in itertools.pairwise(history)), f"samples went backwards: {history}"
    assert value(after, "trainkit_samples_total") > value(before, "trainkit_samples_total")  # type: ignore[operator]
    directory = slot_dir()
    assert directory is not None
    assert sorted(p.name for p in directory.iterdir()) == ["local-rank-0.slot", "local-rank-1.slot"]


def test_agent_exporter_survives_worker_restarts(tmp_path: Path) -> None:
    exporter = start_agent_exporter(
        0, addr="127.0.0.1", env={"POD_NAME": "p-0", "POD_NAMESPACE": "ml"}
    )
    directory = Path(exporter.worker_env()["TRAINKIT_METRICS_DIR"])
    process = None
    try:
        process = start_job(
            TORCHRUN, TORCHRUN_ARGS, tmp_path, job_env(**exporter.worker_env()), mode="fail-once"
        )
        _check_restart(exporter.port, tmp_path, lambda: directory)
        assert stop_job(process, tmp_path) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
        # Every worker ever started recorded into the agent's directory, nowhere else.
        recorded = {path.read_text() for path in tmp_path.glob("env-*.txt")}
        assert recorded == {str(directory)}
    finally:
        if process is not None:
            kill_job(process)
        exporter.close()
    assert not directory.exists(), "the agent must remove its slot directory on close"


def test_local_rank_0_serves_without_trainkit_run(tmp_path: Path) -> None:
    port = free_port()
    run_id = f"metrics-test-{port}"
    directory = local_metrics_dir(port, run_id)
    process = None
    try:
        env = job_env(TRAINKIT_METRICS_PORT=str(port), TRAINKIT_METRICS_HOST="127.0.0.1")
        # --standalone picks a random run id; pin it so the test knows the directory.
        args = [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--rdzv-id",
            run_id,
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
        ]
        process = start_job(TORCHRUN, args, tmp_path, env, mode="fail-once")
        _check_restart(port, tmp_path, lambda: directory)
        assert stop_job(process, tmp_path) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        if process is not None:
            kill_job(process)
        shutil.rmtree(directory, ignore_errors=True)
