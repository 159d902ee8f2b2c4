"""The pod's ``/metrics`` endpoint: served by the trainkit-run agent (or local rank 0 without it).

The agent owns a fresh slot directory for its lifetime, hands it to workers through
``worker_env()`` and deletes it on ``close()``; it never touches the training processes.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainkit.metrics.gpu import GpuSampler, load_nvml
from trainkit.metrics.recorder import (
    METRICS_DIR_VARIABLE,
    METRICS_PORT_VARIABLE,
    _shared_memory_root,
)

__all__ = [
    "DEFAULT_POD_METRICS_PORT",
    "METRICS_ADDR_VARIABLE",
    "MetricsExporter",
    "resolve_metrics_port",
    "serve_in_worker",
    "start_agent_exporter",
    "start_pod_exporter",
]

#: The port used inside a Kubernetes pod when neither ``--metrics-port`` nor the variable is set.
DEFAULT_POD_METRICS_PORT = 9400
#: The address to listen on (default all interfaces, as a pod's scraper needs); 127.0.0.1 for tests.
METRICS_ADDR_VARIABLE = "TRAINKIT_METRICS_ADDR"


def resolve_metrics_port(flag: int | None, env: Mapping[str, str] | None = None) -> int:
    """The port to serve on, 0 meaning off: ``--metrics-port`` if given, else
    ``TRAINKIT_METRICS_PORT``, else 9400 inside a Kubernetes pod and 0 (off) elsewhere.

    Off outside Kubernetes by default so that several jobs on one machine never fight over a port.
    """
    env = os.environ if env is None else env
    if flag is not None:
        if not 0 <= flag < 65536:
            raise ValueError(f"--metrics-port {flag}: must be in 0..65535 (0 disables metrics)")
        return flag
    from trainkit.metrics.recorder import _parse_port

    if env.get(METRICS_PORT_VARIABLE, "").strip() != "":
        return _parse_port(env)
    return DEFAULT_POD_METRICS_PORT if env.get("KUBERNETES_SERVICE_HOST") else 0


class MetricsExporter:
    """A running ``/metrics`` server over one slot directory; ``close()`` stops it.

    ``port`` is the bound port (useful when started with port 0). ``worker_env()`` returns the
    variables workers need to record into this exporter's directory.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int,
        addr: str,
        env: Mapping[str, str],
        job_start_unix_s: float | None,
        owns_directory: bool,
        nvml_loader: Callable[[], tuple[Any | None, str]],
        gpu_interval_s: float,
    ) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from trainkit.metrics.collector import PodCollector, pod_labels

        self.directory = directory
        self.addr = addr
        self._owns_directory = owns_directory
        nvml, self.gpu_note = nvml_loader()
        self._sampler = GpuSampler(nvml, interval_s=gpu_interval_s) if nvml is not None else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = PodCollector(
            directory, labels=pod_labels(env), job_start_unix_s=job_start_unix_s, gpu=self._sampler
        )
        self.registry.register(self.collector)
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as error:
            if self._sampler is not None:
                self._sampler.nvml.nvmlShutdown()
            if error.errno == errno.EADDRINUSE:
                raise OSError(
                    error.errno,
                    f"metrics port {port} on {addr} is already in use; choose another with "
                    f"--metrics-port or {METRICS_PORT_VARIABLE}, or 0 to disable metrics",
                ) from None
            raise
        self.port: int = self._server.server_port
        if self._sampler is not None:
            self._sampler.start()

    def worker_env(self) -> dict[str, str]:
        """Variables to put into every worker's environment (the slot directory)."""
        return {METRICS_DIR_VARIABLE: str(self.directory)}

    def close(self) -> None:
        """Stop serving and sampling; remove the slot directory if this exporter created it."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=5)
        if self._sampler is not None:
            self._sampler.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_agent_exporter(
    port: int,
    *,
    addr: str | None = None,
    env: Mapping[str, str] | None = None,
    gpu_interval_s: float = 5.0,
    nvml_loader: Callable[[], tuple[Any | None, str]] = load_nvml,
) -> MetricsExporter:
    """Serve the pod's ``/metrics`` on ``addr:port`` from the launcher (agent) process.

    Call once before starting workers and put ``handle.worker_env()`` into their environment;
    ``handle.close()`` when the launcher exits. ``port`` 0 binds a free port (see ``handle.port``):
    disabling metrics is the caller's choice, see ``resolve_metrics_port``. Pod labels come from
    ``env`` (default ``os.environ``). Prints one line saying where it serves and whether GPU series
    exist. Raises ``OSError`` naming the port when it is taken. ``addr`` defaults to
    ``TRAINKIT_METRICS_ADDR`` or ``0.0.0.0``.
    """
    env = os.environ if env is None else env
    addr = addr or env.get(METRICS_ADDR_VARIABLE) or "0.0.0.0"
    directory = Path(tempfile.mkdtemp(prefix="trainkit-metrics-", dir=_shared_memory_root()))
    try:
        exporter = MetricsExporter(
            directory,
            port=port,
            addr=addr,
            env=env,
            job_start_unix_s=time.time(),
            owns_directory=True,
            nvml_loader=nvml_loader,
            gpu_interval_s=gpu_interval_s,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    gpu = (
        exporter.gpu_note
        if exporter._sampler is not None
        else f"no GPU series: {exporter.gpu_note}"
    )
    print(
        f"trainkit-run: metrics on http://{addr}:{exporter.port}/metrics ({gpu})",
        file=sys.stderr,
        flush=True,
    )
    return exporter


def start_pod_exporter(
    flag: int | None, env: Mapping[str, str] | None = None
) -> MetricsExporter | None:
    """What trainkit-run calls: resolve the port (``resolve_metrics_port``) and serve it, or None.

    A port the user chose (flag or ``TRAINKIT_METRICS_PORT``) that is taken raises ``OSError``;
    the implicit pod default (9400) being taken only prints one line and leaves metrics off, so a
    second launcher in the same pod, or tests run inside a pod, still start.
    """
    env = os.environ if env is None else env
    port = resolve_metrics_port(flag, env)
    if port == 0:
        return None
    try:
        return start_agent_exporter(port, env=env)
    except OSError as error:
        chosen = flag is not None or env.get(METRICS_PORT_VARIABLE, "").strip() != ""
        if chosen:
            raise
        print(f"trainkit-run: metrics off: {error.strerror or error}", file=sys.stderr, flush=True)
        return None


_worker_exporter: MetricsExporter | None = None


def serve_in_worker(
    directory: Path, port: int, *, env: Mapping[str, str]
) -> MetricsExporter | None:
    """Without trainkit-run: serve ``directory`` from this worker (local rank 0) on a daemon thread.

    A port that is taken is reported and skipped: training goes on without an endpoint.
    """
    global _worker_exporter
    if _worker_exporter is not None:
        return _worker_exporter
    try:
        _worker_exporter = MetricsExporter(
            directory,
            port=port,
            addr=env.get(METRICS_ADDR_VARIABLE) or "0.0.0.0",
            env=env,
            job_start_unix_s=None,
            owns_directory=False,
            nvml_loader=load_nvml,
            gpu_interval_s=5.0,
        )
    except OSError as error:
        print(f"trainkit metrics: not serving /metrics: {error}", file=sys.stderr, flush=True)
        return None
    print(
        f"trainkit metrics: local rank 0 serves http://{_worker_exporter.addr}:{_worker_exporter.port}/metrics "
        f"({_worker_exporter.gpu_note})",
        file=sys.stderr,
        flush=True,
    )
    return _worker_exporter
