"""GPU readings through NVML (nvidia-ml-py), sampled in the agent on a background thread.

nvidia-ml-py is imported lazily; without it (or without a driver) there are no GPU readings and
``load_nvml`` says why in one line. Never called on the training path.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONTAINER_INDEX_LABEL",
    "GPU_LABELS",
    "MODEL_LABEL",
    "UUID_LABEL",
    "GpuReading",
    "GpuSampler",
    "gpu_label_values",
    "load_nvml",
    "read_gpus",
]

#: dcgm-exporter's label names and values, so ``on(UUID)`` joins trainkit's GPU series with DCGM's.
UUID_LABEL = "UUID"
MODEL_LABEL = "modelName"
#: NVML's index of the GPU inside this container. Not DCGM's ``gpu`` label, the host's index: a
#: pod given GPUs 4-7 of a node sees them as 0-3, so a join on a shared ``gpu`` label would pair
#: the wrong devices.
CONTAINER_INDEX_LABEL = "container_gpu"
#: The labels of every ``trainkit_gpu_*`` series, after the pod's own.
GPU_LABELS = (CONTAINER_INDEX_LABEL, UUID_LABEL, MODEL_LABEL)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; a field is None when the device does not support that reading."""

    index: int  # NVML's, inside this container
    uuid: str  # "GPU-<8>-<4>-<4>-<4>-<12>" hex, as NVML (and DCGM's UUID label) write it
    name: str  # the model, as NVML (and DCGM's modelName label) write it
    utilization_ratio: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    power_watts: float | None
    temperature_celsius: float | None
    sm_clock_hertz: float | None


def gpu_label_values(reading: GpuReading) -> list[str]:
    """Values of ``GPU_LABELS`` for one GPU."""
    return [str(reading.index), reading.uuid, reading.name]


def load_nvml() -> tuple[Any | None, str]:
    """Import and initialise NVML: ``(pynvml module, description)`` or ``(None, why not)``."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install 'trainkit[gpu]')"
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as error:
        return None, f"NVML is not available ({error}); no NVIDIA driver in this container?"
    if count == 0:
        pynvml.nvmlShutdown()
        return None, "NVML sees no GPUs in this container"
    driver = _text(_optional(pynvml, pynvml.nvmlSystemGetDriverVersion) or "unknown")
    return pynvml, f"{count} GPU(s) via NVML, driver {driver}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(nvml: Any, call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except nvml.NVMLError:
        return None  # e.g. NVML_ERROR_NOT_SUPPORTED for power on some boards


def read_gpus(nvml: Any) -> list[GpuReading]:
    """Read every GPU this container sees; ``nvml`` is the initialised pynvml module (or a fake)."""
    readings = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        utilization = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
        temperature = _optional(
            nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        sm_clock_mhz = _optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        readings.append(
            GpuReading(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(_optional(nvml, nvml.nvmlDeviceGetName, handle) or "unknown"),
                utilization_ratio=None if utilization is None else utilization.gpu / 100.0,
                memory_used_bytes=None if memory is None else float(memory.used),
                memory_total_bytes=None if memory is None else float(memory.total),
                power_watts=None if power_mw is None else power_mw / 1000.0,
                temperature_celsius=None if temperature is None else float(temperature),
                sm_clock_hertz=None if sm_clock_mhz is None else sm_clock_mhz * 1e6,
            )
        )
    return readings


class GpuSampler:
    """Reads all GPUs every ``interval_s`` seconds on a daemon thread; scrapes take ``latest``.

    Sampling off the scrape keeps ``/metrics`` fast however slow NVML is on a busy node. The first
    reading is taken in ``start`` so the first scrape already has GPU series.
    """

    def __init__(self, nvml: Any, *, interval_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"GPU sampling interval ({interval_s} s) must be positive")
        self.nvml = nvml
        self.interval_s = interval_s
        self.latest: list[GpuReading] = []
        self.last_error: str | None = None
        self.num_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        try:
            self.latest = read_gpus(self.nvml)
            self.last_error = None
        except self.nvml.NVMLError as error:
            # Keep serving the previous readings: a GPU that fell off the bus shows up as a rising
            # trainkit_gpu_sampling_errors_total, not as a crashed agent.
            self.last_error = str(error)
            self.num_errors += 1

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="trainkit-gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self.interval_s))
            self._thread = None
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()
