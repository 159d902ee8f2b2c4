"""trainkit's GPU series join dcgm-exporter's on ``UUID`` in a real Prometheus, as the README shows.

dcgm-exporter needs GPUs, so a loopback server plays the node's exporter with its exact label names
and values: eight host GPUs, of which the pod was given host GPUs 4 and 5 (its 0 and 1).
"""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.trainkit.metrics.fake_nvml import UUID_0, UUID_1, FakeGpu, FakeNvml
from tests.trainkit.metrics.prometheus_server import prometheus_binary, start_prometheus
from trainkit.metrics.collector import PodCollector
from trainkit.metrics.exporter import start_agent_exporter
from trainkit.metrics.gpu import GpuSampler

README = Path(__file__).resolve().parents[3] / "README.md"
MODEL = "NVIDIA H100 80GB HBM3"
#: The node's GPUs by host index, as dcgm-exporter labels them; 4 and 5 are in the pod.
HOST_UUIDS = {
    index: f"GPU-{index:08x}-0000-4000-8000-{index:012x}" for index in (0, 1, 2, 3, 6, 7)
} | {4: UUID_0, 5: UUID_1}
#: The README's example join, checked here against a real Prometheus.
JOIN = "DCGM_FI_DEV_GPU_TEMP * on(UUID) group_left(pod, container_gpu) trainkit_gpu_info"


def dcgm_exposition() -> str:
    lines = [
        "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).",
        "# TYPE DCGM_FI_DEV_GPU_TEMP gauge",
    ]
    for index, uuid in sorted(HOST_UUIDS.items()):
        labels = (
            f'gpu="{index}",UUID="{uuid}",pci_bus_id="00000000:{0x18 + index:02X}:00.0",'
            f'device="nvidia{index}",modelName="{MODEL}",Hostname="node-a"'
        )
        lines.append(f"DCGM_FI_DEV_GPU_TEMP{{{labels}}} {40 + index}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def serving_dcgm() -> Iterator[int]:
    body = dcgm_exposition().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.skipif(prometheus_binary() is None, reason="needs the prometheus binary")
def test_join_on_uuid_pairs_each_container_gpu_with_its_host_gpu(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeGpu(UUID_0), FakeGpu(UUID_1)])
    env = {"POD_NAME": "train-0", "POD_NAMESPACE": "ml"}
    with (
        serving_dcgm() as dcgm_port,
        start_agent_exporter(
            0, addr="127.0.0.1", env=env, nvml_loader=lambda: (nvml, "2 GPU(s) via fake")
        ) as exporter,
        start_prometheus(
            tmp_path / "prometheus", [f"127.0.0.1:{dcgm_port}", f"127.0.0.1:{exporter.port}"]
        ) as prometheus,
    ):
        prometheus.wait_for("trainkit_gpu_info")
        prometheus.wait_for("DCGM_FI_DEV_GPU_TEMP")
        joined = prometheus.query(JOIN)
    found = sorted(
        (r["metric"]["gpu"], r["metric"]["container_gpu"], r["metric"]["UUID"], r["value"][1])
        for r in joined
    )
    # Host GPU 4 is the pod's GPU 0: the UUID pairs them, the index would not.
    assert found == [("4", "0", UUID_0, "44"), ("5", "1", UUID_1, "45")]
    assert {r["metric"]["pod"] for r in joined} == {"train-0"}


def test_readme_maps_every_gpu_series_to_dcgm(tmp_path: Path) -> None:
    text = README.read_text()
    sampler = GpuSampler(FakeNvml([FakeGpu(UUID_0)]))
    sampler.sample()
    families = [
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in PodCollector(tmp_path, job_start_unix_s=0.0, gpu=sampler).collect()
        if family.name.startswith("trainkit_gpu_")
    ]
    assert len(families) == 8
    table = text[text.index("| trainkit series | DCGM series |") :].split("\n\n")[0]
    for name in families:
        assert re.search(rf"^\| `{name}` \| ", table, re.MULTILINE), f"{name} not in the DCGM table"
    assert JOIN in text
