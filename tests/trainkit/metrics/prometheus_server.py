"""A real Prometheus server (Debian's ``prometheus`` binary) on loopback for tests, plus helpers.

Started with its own config and a temporary TSDB, never the system service; stopped on exit.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PrometheusServer", "free_port", "prometheus_binary", "scrape", "start_prometheus"]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
        return response.read().decode()


class PrometheusServer:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, at_unix_s: float | None = None) -> list[dict]:
        params = {"query": promql}
        if at_unix_s is not None:
            params["time"] = f"{at_unix_s:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        return data["result"]

    def wait_for(self, promql: str, timeout_s: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(
            f"Prometheus returned nothing for {promql!r} within {timeout_s} s; log:\n{self.log.read_text()[-3000:]}"
        )


@contextlib.contextmanager
def start_prometheus(
    workdir: Path, targets: list[str], *, scrape_interval_ms: int = 1000
) -> Iterator[PrometheusServer]:
    binary = prometheus_binary()
    assert binary is not None, "the prometheus binary is not installed (apt-get install prometheus)"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    targets_yaml = ", ".join(f"'{target}'" for target in targets)
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval_ms}ms\n"
        f"  evaluation_interval: {scrape_interval_ms}ms\n"
        "scrape_configs:\n"
        "  - job_name: trainkit\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: [{targets_yaml}]}}]\n"
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as log_handle:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(port, process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/-/ready", timeout=2
                ) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"prometheus not ready in 30 s: {log.read_text()[-3000:]}"
            )
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
