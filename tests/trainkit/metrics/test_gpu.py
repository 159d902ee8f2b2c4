"""NVML readings against a fake with pynvml's calls; on a GPU machine, against the real driver."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.trainkit.metrics.fake_nvml import UUID_0, UUID_1, FakeGpu, FakeNvml
from trainkit.metrics.gpu import GpuSampler, load_nvml, read_gpus

DCGM_UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_fake_uuids_are_written_as_nvml_and_dcgm_write_them() -> None:
    assert DCGM_UUID.fullmatch(UUID_0) and DCGM_UUID.fullmatch(UUID_1)


def test_readings_in_base_units() -> None:
    nvml = FakeNvml([FakeGpu(UUID_0), FakeGpu(UUID_1, utilization_percent=5, power_mw=None)])
    first, second = read_gpus(nvml)
    assert (first.index, first.uuid, first.name) == (0, UUID_0, "NVIDIA H100 80GB HBM3")
    assert first.utilization_ratio == pytest.approx(0.87)
    assert first.memory_used_bytes == 40 * 2**30 and first.memory_total_bytes == 80 * 2**30
    assert first.power_watts == pytest.approx(612.0)
    assert first.temperature_celsius == 61.0
    assert first.sm_clock_hertz == 1.98e9
    assert second.index == 1 and second.power_watts is None  # not supported: no series, no crash


def test_sampler_keeps_last_readings_and_counts_errors() -> None:
    nvml = FakeNvml([FakeGpu(UUID_0)])
    sampler = GpuSampler(nvml, interval_s=0.05)
    sampler.start()
    try:
        assert [r.uuid for r in sampler.latest] == [UUID_0]
        nvml.gpus[0].temperature_c = 70
        deadline = time.monotonic() + 5
        while sampler.latest[0].temperature_celsius != 70 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sampler.latest[0].temperature_celsius == 70  # sampled in the background
        nvml.fail_reads = True
        while sampler.num_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sampler.num_errors >= 1 and sampler.last_error == "GPU is lost"
        assert sampler.latest[0].temperature_celsius == 70
    finally:
        sampler.close()
    assert nvml.calls[-1] == "shutdown"


def test_bad_interval_is_named() -> None:
    with pytest.raises(ValueError, match=r"interval \(0 s\)"):
        GpuSampler(FakeNvml([]), interval_s=0)


def test_without_a_driver_load_nvml_says_why() -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver")
    nvml, reason = load_nvml()
    assert nvml is None
    assert "NVML" in reason or "nvidia-ml-py" in reason


@pytest.mark.skipif(not shutil.which("nvidia-smi"), reason="needs an NVIDIA GPU and driver")
def test_real_gpu_readings_are_plausible() -> None:
    nvml, description = load_nvml()
    assert nvml is not None, description
    try:
        readings = read_gpus(nvml)
    finally:
        nvml.nvmlShutdown()
    assert readings
    for reading in readings:
        assert DCGM_UUID.fullmatch(reading.uuid), reading.uuid  # the value DCGM's UUID label has
        assert 0.0 <= reading.utilization_ratio <= 1.0
        assert 0 < reading.memory_used_bytes < reading.memory_total_bytes
        assert reading.memory_total_bytes > 2**30
        assert reading.power_watts is None or 5 < reading.power_watts < 2000
        assert 5 < reading.temperature_celsius < 110
        assert 1e8 < reading.sm_clock_hertz < 4e9
