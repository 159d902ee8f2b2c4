"""trainkit-ray on a real local Ray cluster: torchrun's worker environment (parity with trainkit-run),
a crash resumed bit-exactly from committed checkpoints with every shard row seen once, SIGTERM
turned into an agreed save and exit 75, failures named by rank, and bad input refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from shards import write_shards
from tests.integration import torchrun_contract
from tests.integration.processes import finish as finish_within
from tests.integration.scripts.ray_cluster import ray_cluster, ray_env
from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPTS = Path(__file__).parent / "scripts"
PROBE = SCRIPTS / "probe_env.py"
TRAIN = SCRIPTS / "ray_train.py"
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
TRAINKIT_RAY = [sys.executable, "-m", "launchers.ray.cli"]

# torchrun's worker variables plus trainkit's one, and those that differ on every launch;
# MASTER_ADDR too: torchrun's agent names its host, Ray Train rank 0's node address.
TORCHRUN_VARIABLES = torchrun_contract.TORCHRUN_VARIABLES | {"TRAINKIT_EXIT_STATUS_DIR"}
DIFFER_PER_LAUNCH = torchrun_contract.DIFFER_PER_LAUNCH | {
    "MASTER_ADDR",
    "TRAINKIT_EXIT_STATUS_DIR",
}
# 480 rows, 2 ranks x 8 per batch: 30 steps are exactly one epoch, nothing dropped.
NUM_ROWS, STEPS = 480, 30


def start(launcher: list[str], args: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*launcher, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_env(**env),
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float = 400) -> tuple[int, str]:
    return finish_within(process, timeout_s)


def ray_launch(address: str, num_workers: int, *args: str, **env: str) -> tuple[int, str]:
    return finish(
        start(TRAINKIT_RAY, ["--address", address, "--num-workers", str(num_workers), *args], **env)
    )


def read_records(outdir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(outdir.glob("rank-*.json"))}


def read_samples(out: Path, rank: int) -> list[str]:
    return (out / f"samples-rank{rank}.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Rows with an id, 8 features derived from it and a target."""
    ids = np.arange(NUM_ROWS, dtype=np.int64)
    features = np.sin(ids[:, None] * 0.1 + np.arange(8)).astype(np.float32)
    table = pa.table(
        {
            "id": ids,
            "x": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), 8),
            "y": features.sum(axis=1).astype(np.float32),
        }
    )
    url = str(tmp_path_factory.mktemp("ray-data") / "ds")
    write_shards(table, url, bytes_per_shard=16 << 10, row_group_bytes=4 << 10, progress=False)
    return url


@pytest.fixture(scope="module")
def reference(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same script, uninterrupted, under trainkit-run with 2 processes."""
    base = tmp_path_factory.mktemp("ray-reference")
    args = ["--data", dataset, "--root", str(base / "ckpt"), "--out", str(base / "out")]
    code, output = finish(
        start(
            TRAINKIT_RUN,
            ["--standalone", "--nproc-per-node", "2", str(TRAIN), *args, "--steps", str(STEPS)],
        )
    )
    assert code == 0, output[-4000:]
    return base / "out"


def assert_same_training(reference: Path, out: Path) -> None:
    expected = torch.load(reference / "final.pt", weights_only=True)
    got = torch.load(out / "final.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs from the uninterrupted run"
    seen: list[int] = []
    for rank in (0, 1):
        lines = read_samples(out, rank)
        assert lines == read_samples(reference, rank), f"rank {rank} trained on other samples"
        assert [int(line.split()[0]) for line in lines] == list(range(1, STEPS + 1))
        seen.extend(int(i) for line in lines for i in line.split()[1:])
    # Every row of the epoch reached exactly one rank exactly once, across restarts too.
    assert sorted(seen) == list(range(NUM_ROWS))


def test_worker_environment_matches_trainkit_run(ray_cluster: str, tmp_path: Path) -> None:
    outdirs = {name: tmp_path / name for name in ("trainkit-run", "trainkit-ray")}
    for outdir in outdirs.values():
        outdir.mkdir()
    run_args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    code, output = finish(
        start(TRAINKIT_RUN, [*run_args, str(PROBE), str(outdirs["trainkit-run"])])
    )
    assert code == 0, output[-4000:]
    code, output = ray_launch(
        ray_cluster, 2, "--max-failures", "1", str(PROBE), str(outdirs["trainkit-ray"])
    )
    assert code == 0, output[-4000:]

    theirs_all, ours_all = (read_records(outdirs[n]) for n in ("trainkit-run", "trainkit-ray"))
    assert sorted(ours_all) == sorted(theirs_all) == ["rank-0-restart-0", "rank-1-restart-0"]
    for key, theirs in theirs_all.items():
        ours = ours_all[key]
        theirs_vars = {k: v for k, v in theirs["env"].items() if k in TORCHRUN_VARIABLES}
        ours_vars = {k: v for k, v in ours["env"].items() if k in TORCHRUN_VARIABLES}
        assert set(ours_vars) == set(theirs_vars), key
        for name in set(theirs_vars) - DIFFER_PER_LAUNCH:
            assert ours_vars[name] == theirs_vars[name], (key, name)
        # Ray Train's own variables must not leak: World would then read another source.
        assert "NODE_RANK" not in ours["env"], key
        assert ours["world"]["source"] == theirs["world"]["source"] == "torchrun"
        differ = {"run_id", "master_port", "master_addr"}
        assert {k: v for k, v in ours["world"].items() if k not in differ} == {
            k: v for k, v in theirs["world"].items() if k not in differ
        }
    # Every worker of one launch shares one run id and one store address.
    assert len({r["env"]["TORCHELASTIC_RUN_ID"] for r in ours_all.values()}) == 1
    assert len({r["env"]["MASTER_PORT"] for r in ours_all.values()}) == 1


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("victim", ["training-process", "ray-worker"])
def test_sigkill_of_a_worker_restarts_and_resumes_bit_exactly(
    ray_cluster: str, dataset: str, reference: Path, tmp_path: Path, victim: str
) -> None:
    out = tmp_path / "out"
    process = start(
        TRAINKIT_RAY,
        [
            *("--address", ray_cluster, "--num-workers", "2", "--max-failures", "1", str(TRAIN)),
            *("--data", dataset, "--root", str(tmp_path / "ckpt"), "--out", str(out)),
            *("--steps", str(STEPS), "--step-sleep-s", "0.2"),
        ],
    )
    try:
        target, progress = 12, out / "progress-rank1"
        deadline = time.monotonic() + 300
        while not (
            progress.exists() and progress.read_text() and int(progress.read_text()) >= target
        ):
            assert process.poll() is None, finish(process)[1][-4000:]
            assert time.monotonic() < deadline, "workers never reached the target step"
            time.sleep(0.05)
        pid = int((out / "pid-rank1").read_text())
        # The training process, or the Ray Train worker actor that supervises it.
        os.kill(pid if victim == "training-process" else parent_pid(pid), signal.SIGKILL)
        code, output = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, output[-4000:]
    assert int((out / "pid-rank1").read_text()) != pid, "rank 1 ran again in a new process"
    assert_same_training(reference, out)


def test_sigterm_saves_exits_75_and_resumes_bit_exactly(
    ray_cluster: str, dataset: str, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--address", ray_cluster, "--num-workers", "2", str(TRAIN), "--data", dataset]
    args += ["--root", str(tmp_path / "ckpt"), "--out", str(out), "--steps", str(STEPS)]
    process = start(TRAINKIT_RAY, [*args, "--step-sleep-s", "0.3"], TRAINKIT_GRACE_PERIOD_S="60")
    try:
        target, progress = 6, out / "progress-rank0"
        deadline = time.monotonic() + 300
        while not (
            progress.exists() and progress.read_text() and int(progress.read_text()) >= target
        ):
            assert process.poll() is None, finish(process)[1][-4000:]
            assert time.monotonic() < deadline, "workers never reached the target step"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # to trainkit-ray only, as the kubelet does
        code, output = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == EXIT_PREEMPTED, output[-4000:]
    assert "exited 75 (preempted)" in output
    preempted_at = len(read_samples(out, 0))
    assert target <= preempted_at < STEPS, preempted_at
    assert len(read_samples(out, 1)) == preempted_at, "both ranks stopped at the agreed step"

    code, output = finish(start(TRAINKIT_RAY, args))
    assert code == 0, output[-4000:]
    assert_same_training(reference, out)


def test_sigterm_kills_workers_that_outlast_the_grace_period(
    ray_cluster: str, tmp_path: Path
) -> None:
    grace_s, linger_s = 3, 120
    args = ["--address", ray_cluster, "--num-workers", "2", "--grace-period-s", str(grace_s)]
    process = start(
        TRAINKIT_RAY, [*args, str(PROBE), str(tmp_path), "sleep"], PROBE_LINGER_S=str(linger_s)
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("ready-*"))) < 2:
            assert process.poll() is None, finish(process)[1][-4000:]
            assert time.monotonic() < deadline, "workers never became ready"
            time.sleep(0.1)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
        elapsed_s = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, output[-4000:]
    assert "trainkit-ray: stopped by SIGTERM" in output
    assert {p.name for p in tmp_path.glob("sigterm-*")} == {"sigterm-0", "sigterm-1"}
    # Killed at the grace period, long before the workers would have finished lingering. The
    # lower bound allows 0.5 s: once, under CI load, the launcher exited 2.96 s after this test
    # sent SIGTERM with a 3 s grace period (noted as an open question in the Part 7 notes).
    assert grace_s - 0.5 <= elapsed_s < linger_s, elapsed_s


def test_failing_beyond_the_restarts_names_rank_and_exit_code(
    ray_cluster: str, tmp_path: Path
) -> None:
    code, output = ray_launch(
        ray_cluster, 2, "--max-failures", "1", str(PROBE), str(tmp_path), "fail-always"
    )
    assert code == 1, output[-4000:]
    summary = [line for line in output.splitlines() if line.startswith("trainkit-ray: worker rank")]
    assert len(summary) == 1, output[-4000:]
    assert "worker rank 1 failed first with exit code 3 (exited with an error)" in summary[0]
    assert "after 1 restart(s)" in summary[0] and "launcher exits 1" in summary[0]
    assert {"rank-1-restart-0", "rank-1-restart-1"} <= set(read_records(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-workers", "0", str(PROBE)], "num_workers=0: must be a whole number of 1 or more"),
        (["--num-workers", "2", "missing.py"], "training script 'missing.py' does not exist"),
        (["--num-workers", "2", "--max-failures", "-1", str(PROBE)], "max_failures=-1: must be"),
        (["--num-workers", "2", "--resources-per-worker", "{cpu", str(PROBE)], "not JSON"),
        (["--num-workers", "2", "--env", "NCCL_DEBUG", str(PROBE)], "expected NAME=VALUE"),
        (["--num-workers", "2", "--grace-period-s", "-5", str(PROBE)], "grace_period_s=-5"),
        (["--num-workers", "2", "--run-id", "a/b", str(PROBE)], "run_id='a/b': use letters"),
    ],
    ids=[
        "no-workers",
        "missing-script",
        "negative-failures",
        "bad-resources",
        "bad-env",
        "bad-grace",
        "bad-run-id",
    ],
)
def test_bad_input_is_refused_before_ray_is_contacted(args: list[str], message: str) -> None:
    # No cluster runs for this test: an address nobody listens on must never be reached.
    result = subprocess.run(
        [*TRAINKIT_RAY, "--address", "127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ray_env(),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]


def test_without_ray_installed_the_message_names_the_extra() -> None:
    # sys.modules["ray"] = None makes `import ray` fail as it does where Ray is not installed.
    code = (
        "import sys; sys.modules['ray'] = None; from launchers.ray.cli import main; "
        f"sys.argv = ['trainkit-ray', '--num-workers', '2', {str(PROBE)!r}]; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ray_env()
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install 'trainkit[ray]'" in result.stderr, result.stderr[-3000:]


def test_an_address_that_does_not_answer_fails_in_bounded_time(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install trainkit[ray])")
    from tests.integration.scripts.ray_cluster import free_port

    started = time.monotonic()
    result = subprocess.run(
        [*TRAINKIT_RAY, "--address", f"127.0.0.1:{free_port()}", "--num-workers", "2", str(PROBE)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ray_env(),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "does not answer within 10 s" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started < 100, "ray.init alone retries for minutes"


def test_more_workers_than_the_cluster_holds_fails_with_the_numbers(ray_cluster: str) -> None:
    # Without an autoscaler configuration Ray waits for resources forever; trainkit-ray gives up.
    code, output = ray_launch(
        ray_cluster, 5, "--start-timeout-s", "20", str(PROBE), "/nonexistent-outdir"
    )
    assert code == 1, output[-4000:]
    assert "no worker group started within 20 s: 5 workers x {'CPU': 1}" in output, output[-4000:]
    assert "'CPU': 2.0" in output and "lower --num-workers" in output, output[-4000:]
