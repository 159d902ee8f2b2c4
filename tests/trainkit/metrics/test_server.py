"""The /metrics server's limits: idle and slow clients cost no threads and are closed in time."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.trainkit.metrics.jobs import parse_exposition, wait_until
from tests.trainkit.metrics.prometheus_server import scrape
from trainkit.metrics.exporter import MetricsExporter, ServerLimits, start_agent_exporter

NUM_IDLE = 100


@pytest.fixture
def exporter() -> Iterator[MetricsExporter]:
    limits = ServerLimits(
        idle_timeout_s=1.0, request_deadline_s=3.0, max_connections=32, num_handler_threads=2
    )
    with start_agent_exporter(0, addr="127.0.0.1", env={}, limits=limits) as started:
        yield started


def scraped(port: int) -> str | None:
    try:
        return scrape(port, timeout_s=10.0)
    except OSError:
        return None  # refused or reset: poll again


def closed_by_server(client: socket.socket) -> bool:
    try:
        return client.recv(1) == b""
    except (BlockingIOError, TimeoutError):
        return False
    except OSError:
        return True  # reset


def test_idle_connections_cost_no_threads_and_do_not_block_a_scrape(
    exporter: MetricsExporter,
) -> None:
    threads_before = threading.active_count()
    idle = [
        socket.create_connection(("127.0.0.1", exporter.port), timeout=10) for _ in range(NUM_IDLE)
    ]
    try:
        for client in idle:
            client.setblocking(False)
        samples = wait_until(
            lambda: (text := scraped(exporter.port)) is not None and parse_exposition(text),
            30,
            "a scrape while 100 idle connections are open",
        )
        assert "trainkit_samples_total" in samples  # type: ignore[operator]
        # A thread per connection would add ~100; the server's threads were there before.
        assert threading.active_count() <= threads_before + 1
        wait_until(
            lambda: all(closed_by_server(client) for client in idle),
            30,
            "the server to close every idle connection",
        )
        wait_until(lambda: exporter._server.num_open_connections == 0, 30, "no open connection")  # type: ignore[union-attr]
    finally:
        for client in idle:
            client.close()


def test_a_trickling_client_is_cut_at_the_request_deadline(exporter: MetricsExporter) -> None:
    client = socket.create_connection(("127.0.0.1", exporter.port))
    try:
        client.settimeout(0.3)
        deadline = time.monotonic() + 30
        cut = False
        # One byte every 0.3 s never trips the 1 s idle timeout; the 3 s deadline still ends it.
        while not cut and time.monotonic() < deadline:
            try:
                client.send(b"G")
                cut = client.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                cut = True
        assert cut, "a client sending one byte at a time held its connection for 30 s"
        assert "trainkit_samples_total" in scrape(exporter.port)
    finally:
        client.close()


def test_close_ends_every_connection(tmp_path: Path) -> None:
    exporter = start_agent_exporter(0, addr="127.0.0.1", env={})
    idle = [socket.create_connection(("127.0.0.1", exporter.port)) for _ in range(5)]
    busy = socket.create_connection(("127.0.0.1", exporter.port))
    busy.send(b"GET /metrics HTTP/1.0\r\n")  # a handler now waits for the rest
    try:
        exporter.close()
        for client in [*idle, busy]:
            client.settimeout(10)
            assert closed_by_server(client)
    finally:
        for client in [*idle, busy]:
            client.close()


@pytest.mark.parametrize("name", ["idle_timeout_s", "max_connections", "num_handler_threads"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"ServerLimits.{name}=0"):
        ServerLimits(**{name: 0})


SERVE_WITH_FEW_FDS = """
import os, resource, sys
from trainkit.metrics.exporter import start_agent_exporter

exporter = start_agent_exporter(0, addr="127.0.0.1", env={}, nvml_loader=lambda: (None, "test"))
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
print(exporter.port, flush=True)
sys.stdin.read()  # serve until the test closes stdin
exporter.close()
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_scrapes_succeed_when_idle_connections_exhaust_the_fd_limit() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_FEW_FDS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    idle: list[socket.socket] = []
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(NUM_IDLE)]
        wait_until(
            lambda: "trainkit_samples_total" in (scraped(port) or ""),
            30,
            "a scrape while idle connections use every file descriptor the server may open",
        )
        assert server.poll() is None
        server.stdin.close()
        assert server.wait(timeout=30) == 0
    finally:
        for client in idle:
            client.close()
        if server.poll() is None:
            server.kill()
            server.wait()
