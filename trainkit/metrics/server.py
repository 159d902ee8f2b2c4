"""The HTTP server behind ``/metrics``: a fixed number of threads, a bounded number of connections,
and no connection kept longer than its limits allow.

One loop thread accepts connections and waits until each has sent something; only then does one of
a fixed pool of handler threads serve it. An idle connection costs a file descriptor for at most
``idle_timeout_s`` and never a thread, so idle or slow clients cannot starve Prometheus's scrape.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

__all__ = ["MetricsHTTPServer", "ServerLimits"]

_LOOP_TICK_S = 0.5  # how often the loop looks for overdue connections when nothing happens


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """Bounds of one ``/metrics`` server.

    ``idle_timeout_s`` (default 5): a connection that sends nothing (before its request or in the
    middle of it) for this long is closed. ``request_deadline_s`` (default 15): any connection is
    cut this long after it was accepted, however it trickles. ``max_connections`` (default 64):
    open connections; a new one past it closes the oldest idle one (or itself when none is idle).
    ``num_handler_threads`` (default 4): requests served at once.
    """

    idle_timeout_s: float = 5.0
    request_deadline_s: float = 15.0
    max_connections: int = 64
    num_handler_threads: int = 4

    def __post_init__(self) -> None:
        for name in (
            "idle_timeout_s",
            "request_deadline_s",
            "max_connections",
            "num_handler_threads",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name}={getattr(self, name)!r}: must be > 0")


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s  # type: ignore[attr-defined]
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would flood the launcher's log


class MetricsHTTPServer(WSGIServer):
    """Serves ``app`` on ``host:port`` (port 0: a free one, see ``server_port``) once ``start()``
    is called, within ``limits``; ``close()`` stops it promptly and closes every connection."""

    request_queue_size = 64  # the listen backlog: connections the kernel holds before accept

    def __init__(
        self,
        host: str,
        port: int,
        app: Callable[..., Any],
        limits: ServerLimits | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.set_app(app)
        self.limits = limits or ServerLimits()
        self.socket.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._ready: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_open = 0
        self._idle: dict[socket.socket, tuple[Any, float]] = {}  # oldest first
        self._busy: dict[socket.socket, float] = {}  # queued or being served -> accepted at
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def num_open_connections(self) -> int:
        with self._lock:
            return self._num_open

    def start(self) -> None:
        """Start the loop thread and the handler threads (all daemons)."""
        self._threads = [threading.Thread(target=self._loop, name="metrics-accept", daemon=True)]
        self._threads += [
            threading.Thread(target=self._serve_ready, name=f"metrics-handler-{n}", daemon=True)
            for n in range(self.limits.num_handler_threads)
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop accepting, close every connection and the listening socket; idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            for connection in self._busy:
                _cut(connection)  # a handler blocked on it returns at once
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        for _ in range(self.limits.num_handler_threads):
            self._ready.put(None)
        for thread in self._threads:
            thread.join(timeout=2.0)
        while True:  # handed over after the handlers stopped: nobody serves these any more
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._finished(item[0])
        self.server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ, "listen")
        selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, _events in selector.select(timeout=self._next_wake_s()):
                    if key.data == "listen":
                        self._accept_all(selector)
                    elif key.data != "wake":
                        self._hand_over(selector, key.fileobj)  # type: ignore[arg-type]
                self._expire(selector, time.monotonic())
        finally:
            with self._lock:
                idle, self._idle = list(self._idle), {}
                self._num_open -= len(idle)
            for connection in idle:
                selector.unregister(connection)
                connection.close()
            selector.close()

    def _next_wake_s(self) -> float:
        with self._lock:
            oldest = next(iter(self._idle.values()), None)
        if oldest is None:
            return _LOOP_TICK_S
        return max(
            0.0, min(_LOOP_TICK_S, oldest[1] + self.limits.idle_timeout_s - time.monotonic())
        )

    def _accept_all(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # Out of file descriptors: an idle connection gives its one up for the newcomer,
                # which is likelier to be a scrape. With none idle, leave the newcomer queued in
                # the kernel and pause, rather than spin on a listener that stays readable.
                if error.errno in (errno.EMFILE, errno.ENFILE) and self._evict_oldest_idle(
                    selector
                ):
                    continue
                time.sleep(0.1)
                return
            with self._lock:
                full = self._num_open >= self.limits.max_connections
            if full and not self._evict_oldest_idle(selector):
                connection.close()
                continue
            with self._lock:
                self._num_open += 1
                self._idle[connection] = (address, time.monotonic())
            selector.register(connection, selectors.EVENT_READ, "client")

    def _evict_oldest_idle(self, selector: selectors.BaseSelector) -> bool:
        with self._lock:
            if not self._idle:
                return False
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            self._num_open -= 1
        selector.unregister(oldest)
        oldest.close()
        return True

    def _hand_over(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        with self._lock:
            if connection not in self._idle:
                return  # evicted earlier in this round of events
            address, accepted_at = self._idle.pop(connection)
            self._busy[connection] = accepted_at
        selector.unregister(connection)
        self._ready.put((connection, address))

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        with self._lock:
            idle = [
                c for c, (_a, at) in self._idle.items() if now - at >= self.limits.idle_timeout_s
            ]
            for connection in idle:
                del self._idle[connection]
            self._num_open -= len(idle)
            for connection, accepted_at in self._busy.items():
                if now - accepted_at >= self.limits.request_deadline_s:
                    _cut(connection)
        for connection in idle:
            selector.unregister(connection)
            connection.close()

    def _serve_ready(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            connection, address = item
            try:
                if not self._stopping:
                    self.finish_request(connection, address)
            except Exception:
                pass  # a client that went away or timed out: nothing to answer
            finally:
                self._finished(connection)

    def _finished(self, connection: socket.socket) -> None:
        with self._lock:
            self._busy.pop(connection, None)
            self._num_open -= 1
        self.shutdown_request(connection)


def _cut(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
