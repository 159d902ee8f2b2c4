"""Every exposed metric is documented in the README's metrics table."""

from __future__ import annotations

from pathlib import Path

from tests.trainkit.metrics.fake_nvml import FakeGpu, FakeNvml
from trainkit.metrics.collector import PodCollector
from trainkit.metrics.gpu import GpuSampler
from trainkit.metrics.recorder import Recorder
from trainkit.world import World

ROOT = Path(__file__).resolve().parents[3]


def test_every_metric_is_in_the_readme_table(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    Recorder(tmp_path, World()).step(1, loss=1.0)
    sampler = GpuSampler(FakeNvml([FakeGpu("GPU-a")]))
    sampler.sample()
    families = list(PodCollector(tmp_path, job_start_unix_s=0.0, gpu=sampler).collect())
    assert len(families) > 20
    for family in families:
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"| `{exposed}` | {family.type} |" in text, (
            f"{exposed} ({family.type}) is not in the metrics table"
        )
