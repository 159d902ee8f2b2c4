"""The pod's families from slots: sums over incarnations, gauges from live workers, goodput, GPUs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.trainkit.metrics.fake_nvml import UUID_0, UUID_1, FakeGpu, FakeNvml
from tests.trainkit.metrics.jobs import parse_exposition, value
from trainkit.k8s.identity import PodFiles, PodIdentity, read_pod_identity
from trainkit.metrics.collector import METRIC_NAMES, PodCollector, pod_labels
from trainkit.metrics.gpu import GpuSampler
from trainkit.metrics.recorder import Recorder
from trainkit.metrics.slots import SLOT_BYTES, Field, open_slot, scan_slots
from trainkit.world import World

LABELS = {"pod": "train-0", "namespace": "ml"}


def world(local_rank: int) -> World:
    return World(
        rank=local_rank, world_size=4, local_rank=local_rank, local_world_size=2, num_nodes=2
    )


def exposition(collector: PodCollector) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return parse_exposition(generate_latest(registry).decode())


def dead_slot(directory: Path, local_rank: int, samples: float, loss: float) -> None:
    """A slot whose owner has exited: written by a child process that is gone now."""
    code = (
        "import sys; from trainkit.metrics.slots import open_slot, Field\n"
        f"m, f = open_slot(sys.argv[1], local_rank={local_rank}, local_world_size=2, world_size=4, "
        f"restart_count=0, now_unix_s=0)\nf[Field.SAMPLES] = {samples}; f[Field.LOSS] = {loss}\n"
        "f.release(); m.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(directory)], check=True, timeout=60)


def test_sums_all_slots_and_describes_live_workers(tmp_path: Path) -> None:
    live = Recorder(tmp_path, world(0))
    live.step(10, tokens=100, loss=2.0)
    dead_slot(tmp_path, 1, samples=30, loss=9.0)
    samples = exposition(PodCollector(tmp_path, labels=LABELS, job_start_unix_s=None))
    assert samples['trainkit_samples_total{namespace="ml",pod="train-0"}'] == 40
    assert value(samples, "trainkit_tokens_total") == 100
    assert value(samples, "trainkit_loss") == 2.0  # the dead worker's loss is history
    assert value(samples, "trainkit_local_workers") == 1
    assert value(samples, "trainkit_world_size") == 4
    # Default job start: the oldest slot (the dead one was created at Unix time 0).
    assert value(samples, "trainkit_job_start_time_seconds") == 0


def test_histograms_are_cumulative_with_sum_and_count(tmp_path: Path) -> None:
    mapping, fields = open_slot(
        tmp_path, local_rank=0, local_world_size=1, world_size=1, restart_count=0, now_unix_s=1.0
    )
    fields[Field.STEP_BUCKETS + 0] = 2  # le=0.001
    fields[Field.STEP_BUCKETS + 3] = 5  # le=0.01
    fields[Field.STEP_SUM_S] = 0.04
    samples = exposition(PodCollector(tmp_path, job_start_unix_s=0.0))
    assert samples['trainkit_step_duration_seconds_bucket{le="0.001"}'] == 2
    assert samples['trainkit_step_duration_seconds_bucket{le="0.005"}'] == 2
    assert samples['trainkit_step_duration_seconds_bucket{le="0.01"}'] == 7
    assert samples['trainkit_step_duration_seconds_bucket{le="+Inf"}'] == 7
    assert samples["trainkit_step_duration_seconds_count"] == 7
    assert samples["trainkit_step_duration_seconds_sum"] == 0.04
    fields.release()
    mapping.close()


def test_goodput_is_productive_time_per_worker_over_wall_time(tmp_path: Path) -> None:
    for local_rank, productive in ((0, 30.0), (1, 50.0)):
        mapping, fields = open_slot(
            tmp_path,
            local_rank=local_rank,
            local_world_size=2,
            world_size=2,
            restart_count=0,
            now_unix_s=1.0,
        )
        fields[Field.PRODUCTIVE_S] = productive
        fields.release()
        mapping.close()
    collector = PodCollector(tmp_path, job_start_unix_s=1000.0, clock=lambda: 1100.0)
    assert value(exposition(collector), "trainkit_goodput_ratio") == pytest.approx(
        80.0 / (2 * 100.0)
    )


def test_last_step_time_converts_the_monotonic_stamp(tmp_path: Path) -> None:
    mapping, fields = open_slot(
        tmp_path, local_rank=0, local_world_size=1, world_size=1, restart_count=0, now_unix_s=1.0
    )
    fields[Field.LAST_STEP_MONOTONIC_S] = 50.0
    collector = PodCollector(
        tmp_path, job_start_unix_s=0.0, clock=lambda: 5000.0, monotonic=lambda: 60.0
    )
    assert value(exposition(collector), "trainkit_last_step_timestamp_seconds") == 4990.0
    fields.release()
    mapping.close()


def test_empty_directory_still_answers(tmp_path: Path) -> None:
    samples = exposition(PodCollector(tmp_path / "none", job_start_unix_s=10.0, clock=lambda: 20.0))
    assert value(samples, "trainkit_samples_total") == 0
    assert value(samples, "trainkit_goodput_ratio") == 0
    assert value(samples, "trainkit_loss") is None


def test_torn_or_foreign_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "local-rank-0.slot").write_bytes(b"\x00" * SLOT_BYTES)  # created, not initialised
    (tmp_path / "local-rank-1.slot").write_bytes(b"\x00" * 10)
    assert (
        value(exposition(PodCollector(tmp_path, job_start_unix_s=0.0)), "trainkit_local_workers")
        == 0
    )


def test_gpu_series_carry_dcgm_labels_and_pod_labels(tmp_path: Path) -> None:
    sampler = GpuSampler(FakeNvml([FakeGpu(UUID_0), FakeGpu(UUID_1, power_mw=None)]))
    sampler.sample()
    samples = exposition(PodCollector(tmp_path, labels=LABELS, job_start_unix_s=0.0, gpu=sampler))
    model = 'modelName="NVIDIA H100 80GB HBM3"'
    first = f'{{UUID="{UUID_0}",container_gpu="0",{model},namespace="ml",pod="train-0"}}'
    second = f'{{UUID="{UUID_1}",container_gpu="1",{model},namespace="ml",pod="train-0"}}'
    assert samples["trainkit_gpu_utilization_ratio" + first] == pytest.approx(0.87)
    assert samples["trainkit_gpu_memory_total_bytes" + second] == 80 * 2**30
    assert samples["trainkit_gpu_sm_clock_hertz" + first] == 1.98e9
    assert samples["trainkit_gpu_info" + first] == samples["trainkit_gpu_info" + second] == 1
    power = [k for k in samples if k.startswith("trainkit_gpu_power_watts")]
    assert power == ["trainkit_gpu_power_watts" + first]
    assert value(samples, "trainkit_gpu_sampling_errors_total") == 0
    # DCGM's `gpu` (the host's index) is never used: a join on it would pair the wrong devices.
    assert not any(re.search(r'[{,]gpu="', key) for key in samples)


def test_every_exposed_family_is_listed(tmp_path: Path) -> None:
    Recorder(tmp_path, world(0)).step(1, loss=1.0)
    sampler = GpuSampler(FakeNvml([FakeGpu(UUID_0)]))
    sampler.sample()
    families = {
        metric.name
        for metric in PodCollector(tmp_path, job_start_unix_s=0.0, gpu=sampler).collect()
    }
    assert families == set(METRIC_NAMES)
    assert all(
        not math.isnan(v) for v in exposition(PodCollector(tmp_path, job_start_unix_s=0.0)).values()
    )


def identity_of(
    tmp_path: Path, env: dict[str, str], hostname: str, namespace_file: str | None = None
) -> PodIdentity:
    """The identity ``read_pod_identity`` gives with only these facts (no real /etc files)."""
    files = PodFiles(
        hosts=str(tmp_path / "hosts"),
        resolv_conf=str(tmp_path / "resolv.conf"),
        namespace=str(tmp_path / "namespace"),
    )
    if namespace_file is not None:
        (tmp_path / "namespace").write_text(namespace_file)
    return read_pod_identity(env, hostname=hostname, files=files)


def test_pod_labels_from_the_downward_api(tmp_path: Path) -> None:
    env = {"POD_NAME": "t-1", "POD_NAMESPACE": "ml", "NODE_NAME": "n7"}
    assert pod_labels(identity_of(tmp_path, env, "x"), env) == {
        "pod": "t-1",
        "namespace": "ml",
        "node": "n7",
    }
    assert pod_labels(identity_of(tmp_path, {}, "laptop"), {}) == {}
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert pod_labels(identity_of(tmp_path, in_pod, "t-2"), in_pod) == {"pod": "t-2"}


def test_pod_labels_use_what_the_pod_identity_knows_beyond_the_env(tmp_path: Path) -> None:
    # No POD_NAME / POD_NAMESPACE: the hostname names the pod, the service-account file holds the
    # namespace. Labels read from the env variables alone would lack both.
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    identity = identity_of(tmp_path, env, "train-3", namespace_file="research\n")
    assert identity.namespace == "research"
    assert pod_labels(identity, env) == {"pod": "train-3", "namespace": "research"}


def test_a_malformed_slot_is_skipped_and_counted_never_failing_the_scrape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = Recorder(tmp_path, world(0))
    good.step(10)
    mapping, fields = open_slot(
        tmp_path, local_rank=1, local_world_size=2, world_size=4, restart_count=0, now_unix_s=0
    )
    fields[Field.LOCAL_RANK] = math.nan
    fields.release()
    mapping.close()
    collector = PodCollector(tmp_path, labels=LABELS, job_start_unix_s=0.0)
    first = exposition(collector)
    assert value(first, "trainkit_samples_total") == 10
    assert value(first, "trainkit_metrics_bad_slots_total") == 1
    assert value(exposition(collector), "trainkit_metrics_bad_slots_total") == 2
    err = capsys.readouterr().err
    assert err.count("local-rank-1.slot") == 1 and "nan" in err  # reported once, with the value
    good.close()


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        (Field.PID, -1.0),
        (Field.WORLD_SIZE, math.inf),
        (Field.SAMPLES, math.nan),
        (Field.LOCAL_RANK, 7.0),
    ],
)
def test_what_makes_a_slot_bad(tmp_path: Path, field: int, bad: float) -> None:
    mapping, fields = open_slot(
        tmp_path, local_rank=0, local_world_size=1, world_size=1, restart_count=0, now_unix_s=0
    )
    fields[field] = bad
    scan = scan_slots(tmp_path)
    assert scan.slots == [] and [path.name for path, _problem in scan.bad] == ["local-rank-0.slot"]
    fields.release()
    mapping.close()
