"""Memory-first checkpoints with real launchers, workers and an S3-compatible server that records
every request: a worker-group restart resumes from pod memory without reading storage, the memory
directory is removed at job end, and a job whose memory is gone falls back to storage with a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.fixtures.s3 import S3Server, start_s3_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integration" / "scripts" / "memory_train.py"


@pytest.fixture(scope="module")
def recording_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Path]]:
    """moto's server with its request recorder on: every request lands in a JSON-lines file."""
    recording = tmp_path_factory.mktemp("moto") / "requests.jsonl"
    saved = {
        name: os.environ.get(name) for name in ("MOTO_ENABLE_RECORDING", "MOTO_RECORDER_FILEPATH")
    }
    os.environ.update(MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=str(recording))
    try:
        server = start_s3_server()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield server, recording
    finally:
        server.stop()


def storage_reads(recording: Path, bucket: str) -> list[str]:
    """Object GETs of checkpoint data in ``bucket``: listings, HEADs and commit records (which
    saving reads too, to apply retention) are metadata; DCP and per-rank files are what a restore
    from storage reads."""
    reads = []
    if not recording.exists():
        return reads
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        path = urlparse(entry["url"]).path
        if (
            entry["method"] == "GET"
            and path.startswith(f"/{bucket}/")
            and "/step_" in path
            and not path.endswith("/COMMIT.json")
        ):
            reads.append(path)
    return reads


def records(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(out.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def run_job(
    out: Path, env: dict[str, str], *flags: str, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    full_env.update(OUT_DIR=str(out), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "launchers.run", "--standalone", "--nproc-per-node", "2",
         "--monitor-interval", "0.2", *flags, str(WORKER)],
        env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def test_worker_restart_resumes_from_memory_and_lost_memory_falls_back_to_storage(
    recording_s3: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, recording = recording_s3
    bucket = server.make_bucket()
    env = {
        "STORAGE_URL": f"s3://{bucket}/run",
        "S3_ENDPOINT": server.endpoint_url,
        "HIDDEN": "512",  # 1 MiB of weights + 1 MiB of momentum per snapshot
        "MEMORY_EVERY": "2",
        "STORAGE_EVERY": "5",
        "MAX_STEPS": "10",
        "KILL_RANK": "1",
        "KILL_STEP": "8",  # SIGKILL right after the memory snapshot of step 8 started
    }
    out = tmp_path / "first"
    out.mkdir()
    job = run_job(out, env, "--max-restarts", "1")
    assert job.returncode == 0, job.stderr[-4000:]
    found = records(out)
    saved = {(r["rank"], r["step"]): r["digest"] for r in found if r["kind"] == "step"}
    restores = [r for r in found if r["kind"] == "restore" and r["restart"] == 1]
    assert len(restores) == 2, job.stderr[-4000:]
    # Storage committed step 5 only (step 10's save comes later); memory has 6, or 8 where both
    # ranks committed it before the kill. Never a partial snapshot: the digests match.
    assert {r["tier"] for r in restores} == {"memory"}
    step = restores[0]["step"]
    assert step in (6, 8) and {r["step"] for r in restores} == {step}
    for restore in restores:
        assert restore["digest"] == saved[(restore["rank"], step)]
        assert restore["samples"] == step * 4  # the data position of that step, exactly
    assert storage_reads(recording, bucket) == []
    # The snapshots lived in the pod's memory directory, which trainkit-run removed at job end.
    memory_roots = {Path(r["memory_root"]) for r in restores}
    assert len(memory_roots) == 1 and not next(iter(memory_roots)).parent.exists()

    # A new job on the same storage: its pod memory is empty (removed at the end of the first).
    out = tmp_path / "second"
    out.mkdir()
    job = run_job(out, {**env, "KILL_RANK": "-1", "MAX_STEPS": "11"}, "--max-restarts", "0")
    assert job.returncode == 0, job.stderr[-4000:]
    restores = [r for r in records(out) if r["kind"] == "restore"]
    assert {(r["tier"], r["step"]) for r in restores} == {("storage", 10)}
    assert "no step has a complete memory copy on every rank" in job.stderr
    assert storage_reads(recording, bucket)  # this time storage was read
