"""The pod's ``/metrics`` endpoint: served by the trainkit-run agent (or local rank 0 without it).

The agent owns a fresh slot directory for its lifetime, hands it to workers through
``worker_env()`` and deletes it on ``close()``; it never touches the training processes.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainkit.k8s.identity import PodIdentity, read_pod_identity
from trainkit.metrics.directories import create_agent_directory
from trainkit.metrics.gpu import GpuSampler, load_nvml
from trainkit.metrics.server import MetricsHTTPServer, ServerLimits
from trainkit.metrics.settings import (
    DEFAULT_POD_METRICS_PORT,
    METRICS_ADDR_VARIABLE,
    METRICS_DIR_VARIABLE,
    METRICS_HOST_VARIABLE,
    METRICS_PORT_VARIABLE,
    resolve_metrics_host,
    resolve_metrics_port,
)

__all__ = [
    "DEFAULT_POD_METRICS_PORT",
    "METRICS_ADDR_VARIABLE",
    "METRICS_HOST_VARIABLE",
    "MetricsExporter",
    "ServerLimits",
    "resolve_metrics_host",
    "resolve_metrics_port",
    "serve_in_worker",
    "start_agent_exporter",
    "start_pod_exporter",
]


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
        identity: PodIdentity,
        env: Mapping[str, str],
        job_start_unix_s: float | None,
        owns_directory: bool,
        nvml_loader: Callable[[], tuple[Any | None, str]],
        gpu_interval_s: float,
        limits: ServerLimits | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        from trainkit.metrics.collector import PodCollector, pod_labels

        self.directory = directory
        self.addr = addr
        self._owns_directory = owns_directory
        self._server: MetricsHTTPServer | None = None
        nvml, self.gpu_note = nvml_loader()
        self._sampler = GpuSampler(nvml, interval_s=gpu_interval_s) if nvml is not None else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = PodCollector(
            directory,
            labels=pod_labels(identity, env),
            job_start_unix_s=job_start_unix_s,
            gpu=self._sampler,
        )
        self.registry.register(self.collector)
        try:
            server = MetricsHTTPServer(addr, port, make_wsgi_app(self.registry), limits)
        except OSError as error:
            if self._sampler is not None:
                self._sampler.nvml.nvmlShutdown()
            raise _explain_bind_error(error, addr, port) from None
        self._server = server
        self.port: int = server.server_port
        server.start()
        if self._sampler is not None:
            self._sampler.start()

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def worker_env(self) -> dict[str, str]:
        """Variables to put into every worker's environment (the slot directory)."""
        return {METRICS_DIR_VARIABLE: str(self.directory)}

    def close(self) -> None:
        """Stop serving and sampling; remove the slot directory if this exporter created it.

        Each step runs even when an earlier one is interrupted (a second SIGTERM raising in the
        launcher), so the directory never outlives a launcher that got to call this.
        """
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.close()
        finally:
            try:
                if self._sampler is not None:
                    self._sampler.close()
            finally:
                if self._owns_directory:
                    shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _explain_bind_error(error: OSError, addr: str, port: int) -> OSError:
    if error.errno == errno.EADDRINUSE:
        return OSError(
            error.errno,
            f"metrics port {port} on {addr} is already in use; choose another with "
            f"--metrics-port or {METRICS_PORT_VARIABLE}, or 0 to disable metrics",
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return OSError(
            error.errno,
            f"cannot serve metrics on {addr}: no interface of this machine has that address; set "
            f"{METRICS_HOST_VARIABLE} to the pod IP, 127.0.0.1, or 0.0.0.0 for every interface",
        )
    return error


def start_agent_exporter(
    port: int,
    *,
    addr: str | None = None,
    env: Mapping[str, str] | None = None,
    identity: PodIdentity | None = None,
    gpu_interval_s: float = 5.0,
    nvml_loader: Callable[[], tuple[Any | None, str]] = load_nvml,
    limits: ServerLimits | None = None,
) -> MetricsExporter:
    """Serve the pod's ``/metrics`` on ``addr:port`` from the launcher (agent) process.

    Call once before starting workers and put ``handle.worker_env()`` into their environment;
    ``handle.close()`` when the launcher exits. ``port`` 0 binds a free port (see ``handle.port``):
    disabling metrics is the caller's choice, see ``resolve_metrics_port``. ``addr`` defaults to
    ``resolve_metrics_host`` (the pod IP in a pod, loopback elsewhere); pod labels come from
    ``identity`` (default ``read_pod_identity(env)``, ``env`` default ``os.environ``). Prints one
    line saying where it serves and whether GPU series exist. Raises ``OSError`` naming the port
    when it is taken. Slot directories of earlier launchers that were killed are removed first.
    """
    env = os.environ if env is None else env
    identity = identity or read_pod_identity(env)
    addr = addr or resolve_metrics_host(None, env, identity=identity)
    directory = create_agent_directory()
    try:
        exporter = MetricsExporter(
            directory,
            port=port,
            addr=addr,
            identity=identity,
            env=env,
            job_start_unix_s=time.time(),
            owns_directory=True,
            nvml_loader=nvml_loader,
            gpu_interval_s=gpu_interval_s,
            limits=limits,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    gpu = (
        exporter.gpu_note
        if exporter._sampler is not None
        else f"no GPU series: {exporter.gpu_note}"
    )
    print(f"trainkit-run: metrics on {exporter.url} ({gpu})", file=sys.stderr, flush=True)
    return exporter


def start_pod_exporter(
    flag: int | None,
    env: Mapping[str, str] | None = None,
    *,
    host_flag: str | None = None,
) -> MetricsExporter | None:
    """What trainkit-run calls: resolve the port (``resolve_metrics_port``) and the address
    (``resolve_metrics_host``, ``host_flag`` being ``--metrics-host``) and serve, or return None.

    A port the user chose (flag or ``TRAINKIT_METRICS_PORT``) that is taken raises ``OSError``;
    the implicit pod default (9400) being taken only prints one line and leaves metrics off, so a
    second launcher in the same pod, or tests run inside a pod, still start.
    """
    env = os.environ if env is None else env
    identity = read_pod_identity(env)
    port = resolve_metrics_port(flag, env, identity=identity)
    if port == 0:
        return None
    addr = resolve_metrics_host(host_flag, env, identity=identity)
    try:
        return start_agent_exporter(port, addr=addr, env=env, identity=identity)
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
    """Without trainkit-run: serve ``directory`` from this worker (local rank 0) on daemon threads.

    A port that is taken, or an address or pod identity that cannot be used, is reported and
    skipped: training goes on without an endpoint.
    """
    global _worker_exporter
    if _worker_exporter is not None:
        return _worker_exporter
    try:
        identity = read_pod_identity(env)
        _worker_exporter = MetricsExporter(
            directory,
            port=port,
            addr=resolve_metrics_host(None, env, identity=identity),
            identity=identity,
            env=env,
            job_start_unix_s=None,
            owns_directory=False,
            nvml_loader=load_nvml,
            gpu_interval_s=5.0,
        )
    except (OSError, ValueError) as error:
        print(f"trainkit metrics: not serving /metrics: {error}", file=sys.stderr, flush=True)
        return None
    print(
        f"trainkit metrics: local rank 0 serves {_worker_exporter.url} ({_worker_exporter.gpu_note})",
        file=sys.stderr,
        flush=True,
    )
    return _worker_exporter
