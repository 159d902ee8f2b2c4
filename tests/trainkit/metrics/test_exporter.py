"""The agent exporter: serving, worker environment, cleanup, port choice and errors."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.trainkit.metrics.fake_nvml import UUID_0, FakeGpu, FakeNvml
from tests.trainkit.metrics.jobs import parse_exposition, value
from tests.trainkit.metrics.prometheus_server import scrape
from trainkit.k8s.identity import PodFiles, PodIdentity, read_pod_identity
from trainkit.metrics.exporter import (
    DEFAULT_POD_METRICS_PORT,
    resolve_metrics_host,
    resolve_metrics_port,
    start_agent_exporter,
    start_pod_exporter,
)
from trainkit.metrics.recorder import recorder_from_env


def test_serves_worker_slots_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    exporter = start_agent_exporter(
        0, addr="127.0.0.1", env={"POD_NAME": "p", "POD_NAMESPACE": "ns"}
    )
    directory = Path(exporter.worker_env()["TRAINKIT_METRICS_DIR"])
    try:
        assert directory.is_dir() and list(exporter.worker_env()) == ["TRAINKIT_METRICS_DIR"]
        recorder = recorder_from_env({**exporter.worker_env(), "RANK": "0", "WORLD_SIZE": "1"})
        recorder.step(64, loss=0.25)
        samples = parse_exposition(scrape(exporter.port))
        assert samples['trainkit_samples_total{namespace="ns",pod="p"}'] == 64
        assert value(samples, "trainkit_loss") == 0.25
        assert not any(key.startswith("trainkit_gpu") for key in samples)  # no NVML here
        recorder.close()
    finally:
        exporter.close()
    assert not directory.exists()
    exporter.close()  # idempotent
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f":{exporter.port}/metrics" in lines[0]
    assert "no GPU series" in lines[0] or "GPU(s) via NVML" in lines[0]


def test_gpu_series_through_the_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    nvml = FakeNvml([FakeGpu(UUID_0)])
    with start_agent_exporter(
        0, addr="127.0.0.1", env={}, nvml_loader=lambda: (nvml, "1 GPU(s) via fake")
    ) as exporter:
        samples = parse_exposition(scrape(exporter.port))
    labels = f'UUID="{UUID_0}",container_gpu="0",modelName="NVIDIA H100 80GB HBM3"'
    assert samples[f"trainkit_gpu_temperature_celsius{{{labels}}}"] == 61
    assert "1 GPU(s) via fake" in capsys.readouterr().err
    assert nvml.calls[-1] == "shutdown"


def test_listen_address_from_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with start_agent_exporter(0, env={"TRAINKIT_METRICS_ADDR": "127.0.0.1"}) as exporter:
        assert exporter.addr == "127.0.0.1"
        assert "trainkit_samples_total" in scrape(exporter.port)
    assert "http://127.0.0.1:" in capsys.readouterr().err


def test_taken_port_is_named_and_nothing_is_left_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            OSError, match=f"metrics port {port} on 127.0.0.1 is already in use.*--metrics-port"
        ):
            start_agent_exporter(port, addr="127.0.0.1", env={})


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (9500, {"TRAINKIT_METRICS_PORT": "9600"}, 9500),
        (0, {"TRAINKIT_METRICS_PORT": "9600", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, 0),
        (None, {"TRAINKIT_METRICS_PORT": "9600"}, 9600),
        (None, {"TRAINKIT_METRICS_PORT": "0", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, 0),
        (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, DEFAULT_POD_METRICS_PORT),
        (None, {}, 0),
    ],
)
def test_port_resolution(flag: int | None, env: dict[str, str], expected: int) -> None:
    assert resolve_metrics_port(flag, env) == expected


def test_bad_port_flag_is_named() -> None:
    with pytest.raises(ValueError, match="--metrics-port 70000"):
        resolve_metrics_port(70000, {})


def test_pod_exporter_is_off_by_default_outside_kubernetes() -> None:
    assert start_pod_exporter(None, {}) is None
    assert start_pod_exporter(0, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None


def test_pod_exporter_serves_a_chosen_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = start_pod_exporter(port, {"TRAINKIT_METRICS_ADDR": "127.0.0.1"})
    assert exporter is not None
    try:
        assert exporter.port == port and "trainkit_samples_total" in scrape(port)
    finally:
        exporter.close()


def test_taken_default_port_leaves_metrics_off_but_a_chosen_one_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr("trainkit.metrics.settings.DEFAULT_POD_METRICS_PORT", port)
        pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "TRAINKIT_METRICS_ADDR": "127.0.0.1"}
        assert start_pod_exporter(None, pod) is None
        assert "metrics off" in capsys.readouterr().err
        with pytest.raises(OSError, match="already in use"):
            start_pod_exporter(port, pod)
        with pytest.raises(OSError, match="already in use"):
            start_pod_exporter(None, {**pod, "TRAINKIT_METRICS_PORT": str(port)})


def pod_identity(tmp_path: Path, env: dict[str, str], hosts: str = "") -> PodIdentity:
    (tmp_path / "hosts").write_text(hosts)
    files = PodFiles(
        hosts=str(tmp_path / "hosts"),
        resolv_conf=str(tmp_path / "resolv.conf"),
        namespace=str(tmp_path / "namespace"),
    )
    return read_pod_identity(env, hostname="train-0", files=files)


@pytest.mark.parametrize(
    ("flag", "env", "hosts", "expected"),
    [
        (None, {}, "", "127.0.0.1"),  # not a pod: loopback, never every interface
        (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_IP": "10.1.2.3"}, "", "10.1.2.3"),
        # The pod IP that kubelet wrote into /etc/hosts, with no POD_IP variable.
        (
            None,
            {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
            "10.1.2.4 train-0.svc-a.ml.svc.z train-0\n",
            "10.1.2.4",
        ),
        (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "", "127.0.0.1"),  # pod IP unknown
        (None, {"TRAINKIT_METRICS_HOST": "0.0.0.0", "POD_IP": "10.1.2.3"}, "", "0.0.0.0"),
        (None, {"TRAINKIT_METRICS_ADDR": "::1"}, "", "::1"),  # the former name
        (
            None,
            {"TRAINKIT_METRICS_HOST": "127.0.0.2", "TRAINKIT_METRICS_ADDR": "::1"},
            "",
            "127.0.0.2",
        ),
        ("10.9.9.9", {"TRAINKIT_METRICS_HOST": "0.0.0.0"}, "", "10.9.9.9"),
    ],
)
def test_listen_address_resolution(
    tmp_path: Path, flag: str | None, env: dict[str, str], hosts: str, expected: str
) -> None:
    identity = pod_identity(tmp_path, env, hosts)
    assert resolve_metrics_host(flag, env, identity=identity) == expected


@pytest.mark.parametrize(
    ("flag", "env", "named"),
    [
        (None, {"TRAINKIT_METRICS_HOST": "pod-ip"}, "TRAINKIT_METRICS_HOST='pod-ip'"),
        ("all", {}, "--metrics-host='all'"),
    ],
)
def test_bad_listen_address_is_named(flag: str | None, env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named) + " is not an IP address"):
        resolve_metrics_host(flag, env)


def test_default_listen_address_outside_a_pod_is_loopback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with start_agent_exporter(0, env={}) as exporter:
        assert exporter.addr == "127.0.0.1"
        assert "trainkit_samples_total" in scrape(exporter.port)
    assert "http://127.0.0.1:" in capsys.readouterr().err


def test_an_address_this_machine_lacks_is_named() -> None:
    with pytest.raises(
        OSError, match=r"cannot serve metrics on 192\.0\.2\.1.*TRAINKIT_METRICS_HOST"
    ):
        start_agent_exporter(0, addr="192.0.2.1", env={})


def test_close_removes_the_directory_even_when_interrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = start_agent_exporter(0, addr="127.0.0.1", env={})
    directory = exporter.directory
    server = exporter._server
    assert server is not None

    def interrupted() -> None:
        raise KeyboardInterrupt("a second SIGTERM while stopping")

    monkeypatch.setattr(server, "close", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            exporter.close()
        assert not directory.exists()
    finally:
        monkeypatch.undo()
        server.close()
