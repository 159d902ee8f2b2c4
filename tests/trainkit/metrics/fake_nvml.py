"""A stand-in for the pynvml module with the same calls, for machines without a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

#: UUIDs as NVML (and dcgm-exporter's UUID label) write them: "GPU-" and a hex UUID.
UUID_0 = "GPU-5f2a7c1e-3b9d-4e8a-a1f0-6c2d9e4b7a13"
UUID_1 = "GPU-c81d04b2-97e5-4f3c-b6a8-2e7f1d90c546"


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    utilization_percent: int = 87
    used_bytes: int = 40 * 2**30
    total_bytes: int = 80 * 2**30
    power_mw: int | None = 612_000  # None: NVML_ERROR_NOT_SUPPORTED
    temperature_c: int = 61
    sm_clock_mhz: int = 1980


@dataclass
class FakeNvml:
    gpus: list[FakeGpu]
    fail_reads: bool = False
    calls: list[str] = field(default_factory=list)
    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        if self.fail_reads:
            raise FakeNVMLError("GPU is lost")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return handle.name.encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=handle.utilization_percent, memory=30)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(
            used=handle.used_bytes,
            total=handle.total_bytes,
            free=handle.total_bytes - handle.used_bytes,
        )

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        if handle.power_mw is None:
            raise FakeNVMLError("Not Supported")
        return handle.power_mw

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle.temperature_c

    def nvmlDeviceGetClockInfo(self, handle: FakeGpu, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return handle.sm_clock_mhz
