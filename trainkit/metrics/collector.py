"""The pod's metric families, built on each scrape from the workers' slots and the GPU sampler.

Series carry only pod-level labels (pod, namespace, node; for GPU series also DCGM's UUID and
modelName and the in-container index): never a pid, rank or restart label, so the number of series
is fixed however often workers restart.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from trainkit.k8s.identity import PodIdentity
from trainkit.metrics.gpu import GPU_LABELS, GpuReading, GpuSampler, gpu_label_values
from trainkit.metrics.slots import (
    CHECKPOINT_BUCKETS_S,
    STEP_BUCKETS_S,
    TIER_OPERATIONS,
    Field,
    SlotSnapshot,
    scan_slots,
)

__all__ = ["METRIC_NAMES", "PodCollector", "pod_labels"]

#: Every family the collector can expose (``_total``/``_bucket`` suffixes are added on exposition).
METRIC_NAMES: tuple[str, ...] = (
    "trainkit_samples",
    "trainkit_tokens",
    "trainkit_data_wait_seconds",
    "trainkit_productive_seconds",
    "trainkit_worker_restarts",
    "trainkit_step_duration_seconds",
    "trainkit_checkpoint_blocking_seconds",
    "trainkit_checkpoint_duration_seconds",
    "trainkit_checkpoint_tier_operations",
    "trainkit_checkpoint_tier_bytes",
    "trainkit_checkpoint_tier_seconds",
    "trainkit_checkpoint_replication_lag_steps",
    "trainkit_loss",
    "trainkit_world_size",
    "trainkit_local_workers",
    "trainkit_job_start_time_seconds",
    "trainkit_last_step_timestamp_seconds",
    "trainkit_goodput_ratio",
    "trainkit_gpu_info",
    "trainkit_gpu_utilization_ratio",
    "trainkit_gpu_memory_used_bytes",
    "trainkit_gpu_memory_total_bytes",
    "trainkit_gpu_power_watts",
    "trainkit_gpu_temperature_celsius",
    "trainkit_gpu_sm_clock_hertz",
    "trainkit_gpu_sampling_errors",
    "trainkit_metrics_bad_slots",
)


def pod_labels(identity: PodIdentity, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``pod``, ``namespace`` and ``node`` labels (prometheus-adapter maps the first two to
    Kubernetes objects), those that are known.

    Pod and namespace come from the pod identity, so they are there whenever the pod knows them
    (the hostname is the pod name, the service-account file holds the namespace), not only when the
    Downward API variables are set; outside Kubernetes only what was set explicitly is used.
    ``PodIdentity`` has no node field, so the node comes from ``NODE_NAME`` in ``env``.
    """
    env = os.environ if env is None else env
    labels = {}
    pod = identity.pod_name or (identity.hostname if identity.in_kubernetes else None)
    if pod:
        labels["pod"] = pod
    namespace_source = dict(identity.sources).get("namespace", "default")
    if namespace_source != "default" and (
        identity.in_kubernetes or namespace_source == "POD_NAMESPACE"
    ):
        labels["namespace"] = identity.namespace
    if env.get("NODE_NAME"):
        labels["node"] = env["NODE_NAME"]
    return labels


def _histogram(
    name: str,
    documentation: str,
    slots: list[SlotSnapshot],
    *,
    bounds: tuple[float, ...],
    first_bucket: int,
    sum_field: int,
    labels: dict[str, str],
) -> HistogramMetricFamily:
    counts = [0.0] * (len(bounds) + 1)
    total = 0.0
    for slot in slots:
        total += slot[sum_field]
        for index in range(len(counts)):
            counts[index] += slot[first_bucket + index]
    cumulative, buckets = 0.0, []
    for bound, count in zip((*map(_le, bounds), "+Inf"), counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), buckets=buckets, sum_value=total)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


class PodCollector(Collector):
    """Aggregates the slots in ``directory`` (all local workers, every incarnation) per scrape.

    Counters and histograms sum all slots, dead or alive, so they never go backwards; gauges
    that describe the present (loss, world size, workers) use live workers only. ``job_start_unix_s``
    is when the job began in this pod (default: when the oldest slot was created).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        labels: Mapping[str, str] | None = None,
        job_start_unix_s: float | None = None,
        gpu: GpuSampler | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.labels = dict(labels or {})
        self.job_start_unix_s = job_start_unix_s
        self.gpu = gpu
        self._clock = clock
        self._monotonic = monotonic
        self.num_bad_slot_reads = 0
        self._reported_bad: set[Path] = set()
        self._bad_lock = threading.Lock()  # scrapes may run concurrently

    def collect(self) -> Iterator[Metric]:
        scan = scan_slots(self.directory)
        self._count_bad(scan.bad)
        yield from self._training(scan.slots)
        bad = CounterMetricFamily(
            "trainkit_metrics_bad_slots",
            "Worker slot files skipped by a scrape because their contents were invalid.",
            labels=list(self.labels),
        )
        bad.add_metric(list(self.labels.values()), self.num_bad_slot_reads)
        yield bad
        if self.gpu is not None:
            yield from self._gpus(self.gpu.latest)
            errors = CounterMetricFamily(
                "trainkit_gpu_sampling_errors",
                "NVML readings that failed.",
                labels=list(self.labels),
            )
            errors.add_metric(list(self.labels.values()), self.gpu.num_errors)
            yield errors

    def _count_bad(self, bad: list[tuple[Path, str]]) -> None:
        with self._bad_lock:
            self.num_bad_slot_reads += len(bad)
            new = [(path, problem) for path, problem in bad if path not in self._reported_bad]
            self._reported_bad.update(path for path, _problem in new)
        for path, problem in new:
            print(
                f"trainkit metrics: skipping slot {path}: {problem}; its worker's numbers are left "
                "out of /metrics until the file is removed",
                file=sys.stderr,
                flush=True,
            )

    def _tiers(self, slots: list[SlotSnapshot], live: list[SlotSnapshot]) -> Iterator[Metric]:
        """Memory-first checkpoint tiers: operations, bytes and seconds by tier and operation."""
        names = [*self.labels, "tier", "operation"]
        families = [
            CounterMetricFamily(
                "trainkit_checkpoint_tier_operations",
                "Checkpoint operations by tier (memory, peer, storage) and operation (save, "
                "fetch, restore); restores say which tier each restore came from.",
                labels=names,
            ),
            CounterMetricFamily(
                "trainkit_checkpoint_tier_bytes",
                "Bytes moved by checkpoint operations, by tier and operation.",
                labels=names,
            ),
            CounterMetricFamily(
                "trainkit_checkpoint_tier_seconds",
                "Seconds spent in checkpoint operations, by tier and operation (memory saves: "
                "the blocking copy only).",
                labels=names,
            ),
        ]
        for index, (tier, operation) in enumerate(TIER_OPERATIONS):
            first = Field.TIER_FIELDS + 3 * index
            for offset, family in enumerate(families):
                family.add_metric(
                    [*self.labels.values(), tier, operation],
                    sum(slot[first + offset] for slot in slots),
                )
        yield from families
        lag = GaugeMetricFamily(
            "trainkit_checkpoint_replication_lag_steps",
            "Steps between a worker's newest memory snapshot and its newest replica on the peer "
            "pod, worst over live workers.",
            labels=list(self.labels),
        )
        lag.add_metric(
            list(self.labels.values()),
            max((slot[Field.REPLICATION_LAG_STEPS] for slot in live), default=0.0),
        )
        yield lag

    def _training(self, slots: list[SlotSnapshot]) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())
        live = [slot for slot in slots if slot.alive]

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, documentation, labels=names)
            family.add_metric(values, value)
            return family

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, documentation, labels=names)
            family.add_metric(values, value)
            return family

        def total(field: int) -> float:
            return sum(slot[field] for slot in slots)

        yield counter(
            "trainkit_samples", "Samples consumed by this pod's workers.", total(Field.SAMPLES)
        )
        yield counter(
            "trainkit_tokens", "Tokens consumed by this pod's workers.", total(Field.TOKENS)
        )
        yield counter(
            "trainkit_data_wait_seconds",
            "Time workers waited for their next batch, summed over this pod's workers.",
            total(Field.DATA_WAIT_S),
        )
        yield counter(
            "trainkit_productive_seconds",
            "Step time minus data wait and checkpoint blocking, summed over this pod's workers.",
            total(Field.PRODUCTIVE_S),
        )
        yield counter(
            "trainkit_worker_restarts",
            "Worker group restarts by the launcher in this pod (TORCHELASTIC_RESTART_COUNT).",
            max((slot[Field.RESTART_COUNT] for slot in slots), default=0.0),
        )
        histograms = (
            (
                "trainkit_step_duration_seconds",
                "Time between consecutive training steps of a worker.",
                STEP_BUCKETS_S,
                Field.STEP_BUCKETS,
                Field.STEP_SUM_S,
            ),
            (
                "trainkit_checkpoint_blocking_seconds",
                "Time a checkpoint blocked a worker's training.",
                CHECKPOINT_BUCKETS_S,
                Field.CKPT_BLOCKING_BUCKETS,
                Field.CKPT_BLOCKING_SUM_S,
            ),
            (
                "trainkit_checkpoint_duration_seconds",
                "Total time of a worker's checkpoint, async part included.",
                CHECKPOINT_BUCKETS_S,
                Field.CKPT_TOTAL_BUCKETS,
                Field.CKPT_TOTAL_SUM_S,
            ),
        )
        for name, documentation, bounds, first_bucket, sum_field in histograms:
            yield _histogram(
                name,
                documentation,
                slots,
                bounds=bounds,
                first_bucket=first_bucket,
                sum_field=sum_field,
                labels=self.labels,
            )

        yield from self._tiers(slots, live)

        losses = [slot[Field.LOSS] for slot in live if not math.isnan(slot[Field.LOSS])]
        if losses:
            yield gauge(
                "trainkit_loss",
                "Last reported training loss, mean over live workers.",
                sum(losses) / len(losses),
            )
        sized = live or slots
        if sized:
            yield gauge(
                "trainkit_world_size",
                "Workers in the whole training job.",
                max(slot[Field.WORLD_SIZE] for slot in sized),
            )
        yield gauge("trainkit_local_workers", "Live training workers in this pod.", len(live))

        now = self._clock()
        job_start = self.job_start_unix_s
        if job_start is None and slots:
            job_start = min(slot[Field.CREATED_UNIX_S] for slot in slots)
        if job_start is not None:
            yield gauge(
                "trainkit_job_start_time_seconds",
                "When the job began in this pod (Unix time).",
                job_start,
            )
            local_world_size = max((slot[Field.LOCAL_WORLD_SIZE] for slot in slots), default=0.0)
            elapsed = now - job_start
            goodput = (
                total(Field.PRODUCTIVE_S) / (local_world_size * elapsed)
                if local_world_size and elapsed > 0
                else 0.0
            )
            yield gauge(
                "trainkit_goodput_ratio",
                "Productive step time over wall time since the job began, per worker "
                "(restarts, start-up, data and checkpoint stalls count as lost).",
                min(1.0, goodput),
            )
        last_steps = [
            slot[Field.LAST_STEP_MONOTONIC_S]
            for slot in slots
            if not math.isnan(slot[Field.LAST_STEP_MONOTONIC_S])
        ]
        if last_steps:
            # Workers stamp CLOCK_MONOTONIC (cheap, shared by the host); convert to Unix time here.
            yield gauge(
                "trainkit_last_step_timestamp_seconds",
                "When a worker of this pod last finished a step (Unix time).",
                now - (self._monotonic() - max(last_steps)),
            )

    def _gpus(self, readings: list[GpuReading]) -> Iterator[Metric]:
        names = [*self.labels, *GPU_LABELS]
        pod_values = list(self.labels.values())
        info = GaugeMetricFamily(
            "trainkit_gpu_info",
            "GPUs this pod sees (value 1), labelled like DCGM's series (UUID, modelName).",
            labels=names,
        )
        series = (
            (
                "trainkit_gpu_utilization_ratio",
                "Fraction of time a kernel ran on the GPU (NVML utilization).",
                "utilization_ratio",
            ),
            ("trainkit_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
            ("trainkit_gpu_memory_total_bytes", "GPU memory in total.", "memory_total_bytes"),
            ("trainkit_gpu_power_watts", "GPU power draw.", "power_watts"),
            ("trainkit_gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
            ("trainkit_gpu_sm_clock_hertz", "Current SM clock.", "sm_clock_hertz"),
        )
        families = [
            (GaugeMetricFamily(name, documentation, labels=names), attribute)
            for name, documentation, attribute in series
        ]
        for reading in readings:
            values = [*pod_values, *gpu_label_values(reading)]
            info.add_metric(values, 1.0)
            for family, attribute in families:
                value = getattr(reading, attribute)
                if value is not None:
                    family.add_metric(values, value)
        if readings:
            yield info
            for family, _attribute in families:
                if family.samples:
                    yield family
