"""A real Prometheus scrapes a running ``trainkit-run --metrics-port`` job through a worker restart.

The PromQL of the shipped prometheus-adapter rules and KEDA trigger runs against what Prometheus
stored, and the answers are compared with what the job itself logged.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from tests.trainkit.metrics.jobs import (
    TRAINKIT_RUN,
    job_env,
    kill_job,
    start_job,
    stop_job,
    wait_until,
)
from tests.trainkit.metrics.prometheus_server import free_port, prometheus_binary, start_prometheus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(170),
    pytest.mark.skipif(
        prometheus_binary() is None,
        reason="needs the prometheus binary (apt-get install prometheus)",
    ),
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "metrics"
NAMESPACE, POD = "ml", "trainkit-train-0"  # what the shipped KEDA query selects
WINDOW_S = 10  # the rules use [2m]; the test job runs for seconds, so evaluate them over 10 s
SAMPLES_PER_STEP, DATA_WAIT_S = 32, 0.005  # as in tests/trainkit/metrics/scripts/metrics_job.py


def adapter_rules() -> dict[str, dict]:
    configmap = yaml.safe_load((DEPLOY / "prometheus-adapter-config.yaml").read_text())
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    return {rule["name"]["as"]: rule for rule in rules}


def render_adapter_query(rule: dict, *, namespace: str, pods: list[str]) -> str:
    """What prometheus-adapter sends for a Pods metric of ``pods`` in ``namespace``."""
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query, f"unrendered template field in {query!r}"
    return _shorten_windows(query)


def _shorten_windows(query: str) -> str:
    shortened, count = re.subn(r"\[2m\]", f"[{WINDOW_S}s]", query)
    assert count == len(re.findall(r"\[\d+[smhd]\]", query)), f"unexpected ranges in {query!r}"
    return shortened


def logged_rate(outdir: Path, start: float, end: float, restart: int) -> float:
    """Samples per second of the whole pod in [start, end], from the job's own progress logs."""
    total = 0.0
    for path in sorted(outdir.glob("progress-*.txt")):
        points = [
            tuple(map(float, line.split()))
            for line in path.read_text().splitlines()
            if line.strip()
        ]
        points = [(t, s) for t, s, r in points if r == restart]
        inside = [(t, s) for t, s in points if start <= t <= end]
        assert len(inside) >= 2, f"{path.name}: too few progress points in [{start}, {end}]"
        (t0, s0), (t1, s1) = inside[0], inside[-1]
        total += (s1 - s0) / (t1 - t0)
    return total


def _single_value(result: list[dict], query: str) -> float:
    assert len(result) == 1, f"{query!r} returned {len(result)} series, expected one: {result}"
    return float(result[0]["value"][1])


def test_prometheus_scrapes_trainkit_run_job(tmp_path: Path) -> None:
    metrics_port = free_port()
    env = job_env(
        POD_NAME=POD, POD_NAMESPACE=NAMESPACE, NODE_NAME="node-a", TRAINKIT_METRICS_HOST="127.0.0.1"
    )
    launcher_args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    launcher_args += ["--metrics-port", str(metrics_port)]
    process = None
    outdir = tmp_path / "job"
    outdir.mkdir()
    try:
        process = start_job(TRAINKIT_RUN, launcher_args, outdir, env, mode="fail-once")
        with start_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]) as prometheus:
            log = outdir / "launcher.log"
            wait_until(
                lambda: prometheus.query('trainkit_worker_restarts_total{job="trainkit"} == 1'),
                90,
                "Prometheus to see the worker restart",
                log,
            )
            restarted_at = time.time()
            wait_until(
                lambda: time.time() > restarted_at + WINDOW_S + 4,
                30,
                "a steady window after the restart",
            )
            at = time.time() - 1.5  # the last scrape before this is surely stored
            assert process.poll() is None, log.read_text()[-3000:]

            # Every documented training series exists exactly once for the pod.
            names = {
                row["metric"]["__name__"]: int(row["value"][1])
                for row in prometheus.query(
                    'count by (__name__) ({job="trainkit", __name__=~"trainkit_.*"})', at
                )
            }
            for name in (
                "trainkit_samples_total",
                "trainkit_tokens_total",
                "trainkit_data_wait_seconds_total",
                "trainkit_productive_seconds_total",
                "trainkit_worker_restarts_total",
                "trainkit_loss",
                "trainkit_world_size",
                "trainkit_local_workers",
                "trainkit_job_start_time_seconds",
                "trainkit_goodput_ratio",
                "trainkit_last_step_timestamp_seconds",
                "trainkit_step_duration_seconds_count",
                "trainkit_checkpoint_blocking_seconds_sum",
            ):
                assert names.get(name) == 1, (
                    f"{name}: {names.get(name)} series in Prometheus ({sorted(names)})"
                )
            labels = prometheus.query('trainkit_samples_total{job="trainkit"}', at)[0]["metric"]
            assert (labels["pod"], labels["namespace"], labels["node"]) == (
                POD,
                NAMESPACE,
                "node-a",
            )
            assert _single_value(prometheus.query("trainkit_world_size", at), "world size") == 2
            assert (
                _single_value(prometheus.query("trainkit_local_workers", at), "local workers") == 2
            )

            # The adapter rules, as prometheus-adapter renders them for this pod.
            rules = adapter_rules()
            query = lambda name: render_adapter_query(rules[name], namespace=NAMESPACE, pods=[POD])  # noqa: E731
            expected_rate = logged_rate(outdir, at - WINDOW_S, at, restart=1)
            rate = _single_value(
                prometheus.query(query("trainkit_samples_per_second"), at), "samples/s"
            )
            assert abs(rate - expected_rate) <= 0.15 * expected_rate, (rate, expected_rate)
            step_s = _single_value(
                prometheus.query(query("trainkit_step_seconds"), at), "step seconds"
            )
            expected_step_s = 2 * SAMPLES_PER_STEP / expected_rate  # two workers stepping together
            assert abs(step_s - expected_step_s) <= 0.15 * expected_step_s, (
                step_s,
                expected_step_s,
            )
            wait_ratio = _single_value(
                prometheus.query(query("trainkit_data_wait_ratio"), at), "data wait"
            )
            assert abs(wait_ratio - DATA_WAIT_S / step_s) <= 0.25 * DATA_WAIT_S / step_s, (
                wait_ratio,
                step_s,
            )
            goodput = _single_value(
                prometheus.query(query("trainkit_goodput_ratio"), at), "goodput"
            )
            # Lost: start-up, the restart and the reported data wait; the rest of each step counts.
            assert 0.2 < goodput < 1 - DATA_WAIT_S / step_s + 0.02, goodput

            # The KEDA trigger: pods needed for its target throughput at the current per-pod rate.
            scaled = yaml.safe_load((DEPLOY / "keda-scaledobject.yaml").read_text())
            trigger = scaled["spec"]["triggers"][0]["metadata"]
            target = float(re.match(r"\s*([0-9.]+)\s*/", trigger["query"]).group(1))  # type: ignore[union-attr]
            needed = _single_value(
                prometheus.query(_shorten_windows(trigger["query"]), at), "KEDA query"
            )
            assert abs(needed - target / expected_rate) <= 0.15 * target / expected_rate, (
                needed,
                target,
                expected_rate,
            )

        assert stop_job(process, outdir) == 0, (outdir / "launcher.log").read_text()[-3000:]
        slot_dirs = {path.read_text() for path in outdir.glob("env-*.txt")}
        assert len(slot_dirs) == 1 and "" not in slot_dirs, slot_dirs
        assert not any(Path(d).exists() for d in slot_dirs), (
            "the launcher left its metrics directory behind"
        )
    finally:
        if process is not None:
            kill_job(process)
