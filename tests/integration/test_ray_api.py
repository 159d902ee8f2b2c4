"""``launchers.ray.run`` from Python on a real local Ray cluster: a function target with its
return values, and each node's ``/metrics`` served as trainkit-run's agent serves it."""

from __future__ import annotations

import os
import re
import runpy
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from launchers.ray import LaunchResult, run
from tests.integration.scripts.ray_cluster import free_port, ray_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# Loaded by path: the functions belong to no importable module, so Ray ships them by value.
FUNCTIONS = runpy.run_path(str(Path(__file__).parent / "scripts" / "ray_functions.py"))


def test_a_function_runs_on_every_rank_and_returns_its_values(ray_cluster: str) -> None:
    result = run(
        FUNCTIONS["allreduce_ranks"],
        (2.0,),
        kwargs={"offset": 0.5},
        num_workers=2,
        address=ray_cluster,
    )
    assert result.exit_code == 0, result.message
    assert result.restarts == 0
    assert result.return_values is not None and len(result.return_values) == 2
    for rank, value in enumerate(result.return_values):
        # (1*2 + 0.5) + (2*2 + 0.5): the all-reduce crossed both training processes.
        assert value["sum"] == 7.0
        assert value["world"]["rank"] == rank and value["world"]["world_size"] == 2
        assert value["world"]["source"] == "torchrun"
        assert value["pid"] != os.getpid()
    assert result.return_values[0]["pid"] != result.return_values[1]["pid"]


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def sample_value(text: str, name: str) -> float | None:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_each_node_serves_metrics_of_its_workers(ray_cluster: str, tmp_path: Path) -> None:
    port = free_port()
    results: list[LaunchResult | BaseException] = []

    def launch_in_thread() -> None:
        try:
            results.append(
                run(
                    FUNCTIONS["record_steps_until_released"],
                    (str(tmp_path), 5, 8),
                    num_workers=2,
                    address=ray_cluster,
                    metrics_port=port,
                    env={"TRAINKIT_METRICS_ADDR": "127.0.0.1"},
                )
            )
        except BaseException as error:
            results.append(error)

    thread = threading.Thread(target=launch_in_thread, daemon=True)
    thread.start()
    try:
        text, deadline = "", time.monotonic() + 300
        while sample_value(text, "trainkit_samples_total") != 2 * 5 * 8:
            assert thread.is_alive(), results
            assert time.monotonic() < deadline, f"/metrics never showed 80 samples:\n{text[-3000:]}"
            time.sleep(0.5)
            text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert sample_value(text, "trainkit_local_workers") == 2
        assert sample_value(text, "trainkit_world_size") == 2
    finally:
        (tmp_path / "release").write_text("1")
        thread.join(timeout=300)
    assert len(results) == 1 and isinstance(results[0], LaunchResult), results
    assert results[0].exit_code == 0 and results[0].return_values == [0, 1], results[0]
    # The exporter went away with the run: the port is free again.
    assert scrape(f"http://127.0.0.1:{port}/metrics") == ""
