"""trainkit-run against real torchrun: worker environment parity, restarts, signals, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROBE = Path(__file__).parent / "scripts" / "probe_env.py"
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# torchrun's worker variables; the comparison skips those that differ by design on every launch.
TORCHRUN_VARIABLES = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
}
DIFFER_PER_LAUNCH = {"TORCHELASTIC_RUN_ID", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"}


def launcher_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


def launch(launcher: list[str], args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=150, env=launcher_env(**env)
    )


def read_records(outdir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(outdir.glob("rank-*.json"))}


def test_worker_environment_matches_torchrun(tmp_path: Path) -> None:
    recorded = {}
    for name, launcher in (("torchrun", TORCHRUN), ("trainkit", TRAINKIT_RUN)):
        outdir = tmp_path / name
        outdir.mkdir()
        result = launch(
            launcher,
            [
                "--standalone",
                "--nproc-per-node",
                "2",
                "--max-restarts",
                "1",
                str(PROBE),
                str(outdir),
            ],
        )
        assert result.returncode == 0, result.stderr[-3000:]
        recorded[name] = read_records(outdir)
    assert (
        sorted(recorded["torchrun"])
        == sorted(recorded["trainkit"])
        == ["rank-0-restart-0", "rank-1-restart-0"]
    )
    for key, theirs in recorded["torchrun"].items():
        ours = recorded["trainkit"][key]
        theirs_vars = {k: v for k, v in theirs["env"].items() if k in TORCHRUN_VARIABLES}
        ours_vars = {k: v for k, v in ours["env"].items() if k in TORCHRUN_VARIABLES}
        assert set(ours_vars) == set(theirs_vars), key
        for name in set(theirs_vars) - DIFFER_PER_LAUNCH:
            assert ours_vars[name] == theirs_vars[name], (key, name)
        assert ours["world"]["source"] == theirs["world"]["source"] == "torchrun"
        assert {k: v for k, v in ours["world"].items() if k not in {"run_id", "master_port"}} == {
            k: v for k, v in theirs["world"].items() if k not in {"run_id", "master_port"}
        }


def test_restarts_once_then_succeeds(tmp_path: Path) -> None:
    result = launch(
        TRAINKIT_RUN,
        [
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            str(PROBE),
            str(tmp_path),
            "fail-once",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(read_records(tmp_path)) == {
        "rank-0-restart-0",
        "rank-1-restart-0",
        "rank-0-restart-1",
        "rank-1-restart-1",
    }


def test_failing_twice_names_rank_and_exit_code(tmp_path: Path) -> None:
    result = launch(
        TRAINKIT_RUN,
        [
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            str(PROBE),
            str(tmp_path),
            "fail-always",
        ],
    )
    assert result.returncode == 1
    summary = [
        line for line in result.stderr.splitlines() if line.startswith("trainkit-run: worker rank")
    ]
    assert len(summary) == 1, result.stderr[-3000:]
    assert "worker rank 1 (local rank 1) failed first with exit code 3" in summary[0]
    assert "error file:" in summary[0] and "launcher exits 1" in summary[0]
    assert "rank-1-restart-1" in read_records(tmp_path)


def start_sleeping_job(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            *TRAINKIT_RUN,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(PROBE),
            str(tmp_path),
            "sleep",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launcher_env(**env),
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("ready-*"))) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"workers never became ready: {process.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return process


def stop_group(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.mark.parametrize(
    ("linger_s", "term_exit", "expected_exit"),
    [(1.0, "", 143), (30.0, "", 143), (1.0, str(EXIT_PREEMPTED), EXIT_PREEMPTED)],
    ids=["workers-exit-in-time", "workers-killed-at-timeout", "workers-preempted"],
)
def test_sigterm_reaches_workers_within_the_grace_period(
    tmp_path: Path, linger_s: float, term_exit: str, expected_exit: int
) -> None:
    grace_s = 6
    process = start_sleeping_job(
        tmp_path,
        TRAINKIT_GRACE_PERIOD_S=str(grace_s),
        PROBE_LINGER_S=str(linger_s),
        PROBE_TERM_EXIT=term_exit,
    )
    try:
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        finished = time.time()
    finally:
        stop_group(process)
    arrivals = [float(path.read_text()) - sent for path in tmp_path.glob("sigterm-*")]
    assert len(arrivals) == 2, stderr[-3000:]
    assert max(arrivals) < 2.0, f"SIGTERM reached workers late: {arrivals}"
    assert process.returncode == expected_exit, stderr[-3000:]
    # Workers that linger past the grace period are killed at it, not after torch's default 30 s.
    assert finished - sent < min(linger_s, grace_s) + 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-flag", "x.py"], "unrecognized arguments: --no-such-flag"),
        (
            ["--nnodes", "3:2", "x.py"],
            "--nnodes 3:2: the minimum (3) must be at least 1 and not above the maximum (2)",
        ),
        (
            ["--standalone", "does/not/exist.py"],
            "training script 'does/not/exist.py' does not exist",
        ),
        (["--nproc-per-node", "two", "x.py"], "--nproc-per-node 'two'"),
    ],
)
def test_bad_input_is_a_usage_error(args: list[str], message: str) -> None:
    result = launch(TRAINKIT_RUN, args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    assert shutil.which("trainkit-run") or Path(sys.executable).with_name("trainkit-run").exists()


def test_process_group_forms_again_after_a_restart() -> None:
    # The restarted group must not pick up the previous attempt's addresses from the agent store.
    script = Path(__file__).parent / "scripts" / "allreduce_restart.py"
    result = launch(
        TRAINKIT_RUN, ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(script)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Workers share the launcher's stdout, so their lines may interleave: match, don't split.
    reports = sorted(re.findall(r"rank (\d) attempt (\d) value (\d+)", result.stdout))
    assert reports == [("0", "1", "1024"), ("1", "1", "1024")], result.stdout
