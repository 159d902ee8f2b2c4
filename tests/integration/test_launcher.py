"""trainkit-run against real torchrun: worker environment parity, restarts, signals, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.torchrun_contract import DIFFER_PER_LAUNCH, TORCHRUN_VARIABLES
from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROBE = Path(__file__).parent / "scripts" / "probe_env.py"
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rendezvous_flags(rendezvous: str) -> list[str]:
    """``standalone``: trainkit's loopback backend; ``c10d``: torch's, on a loopback endpoint;
    ``static``: torch's default backend with a master port (one store for every restart)."""
    if rendezvous == "standalone":
        return ["--standalone"]
    if rendezvous == "static":
        return ["--nnodes", "1", "--master-port", str(free_port())]
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]


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
        assert ours["parent_death_signal"] == signal.SIGKILL  # dies with its launcher
        assert theirs["parent_death_signal"] == 0
        # The worker bootstrap keeps torchrun's contract: the script runs as __main__ with the
        # same argv (but each launcher's own output directory) and sys.path.
        assert ours["argv"] == [str(PROBE), str(tmp_path / "trainkit")]
        assert theirs["argv"] == [str(PROBE), str(tmp_path / "torchrun")]
        assert (
            (ours["path0"], ours["name"])
            == (theirs["path0"], theirs["name"])
            == (
                str(PROBE.parent),
                "__main__",
            )
        )
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


def read_worker_pids(tmp_path: Path) -> list[int]:
    deadline = time.monotonic() + 10
    while True:
        texts = [path.read_text() for path in sorted(tmp_path.glob("ready-*"))]
        if all(text.isdigit() for text in texts):
            return [int(text) for text in texts]
        assert time.monotonic() < deadline, f"unreadable ready files: {texts}"
        time.sleep(0.05)


def is_running(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"  # a zombie has exited, only its parent has not reaped it yet


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
    # Forwarded at once, not at the end of the shutdown: each worker recorded it within the grace
    # period (a tighter number would measure the shared machine's load, not the launcher).
    assert max(arrivals) < grace_s, f"SIGTERM reached workers late: {arrivals}"
    assert process.returncode == expected_exit, stderr[-3000:]
    if linger_s > grace_s:
        # Killed at the grace period: before they would have finished lingering (and before
        # torch's default 30 s); the process.communicate timeout bounds the other cases.
        assert finished - sent < linger_s


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
        (["-m", "--no-python", "x"], "-m and --no-python cannot be used together"),
        (
            ["--rdzv-backend", "k8s", "--rdzv-endpoint", "train", "--nnodes", "2", str(PROBE)],
            "TRAINKIT_JOB_TOKEN is not set",
        ),
    ],
)
def test_bad_input_is_a_usage_error(args: list[str], message: str) -> None:
    result = launch(TRAINKIT_RUN, args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    assert shutil.which("trainkit-run") or Path(sys.executable).with_name("trainkit-run").exists()


@pytest.mark.parametrize("rendezvous", ["standalone", "c10d"])
def test_process_group_forms_again_after_a_restart(rendezvous: str) -> None:
    # The restarted group must not pick up the previous attempt's addresses from the agent store;
    # with c10d trainkit.init() joins without the agent store (TORCHELASTIC_USE_AGENT_STORE=False).
    script = Path(__file__).parent / "scripts" / "allreduce_restart.py"
    result = launch(
        TRAINKIT_RUN,
        [
            *rendezvous_flags(rendezvous),
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            str(script),
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Workers share the launcher's stdout, so their lines may interleave: match, don't split.
    reports = sorted(re.findall(r"rank (\d) attempt (\d) value (\d+)", result.stdout))
    assert reports == [("0", "1", "1024"), ("1", "1", "1024")], result.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rendezvous", ["standalone", "c10d", "static"])
def test_plain_torch_script_recovers_from_every_restart(rendezvous: str) -> None:
    # A script with only torch.distributed (no trainkit) joins through env:// itself; three times
    # a worker is SIGKILLed after an all_reduce and the next attempt must form its group again.
    script = Path(__file__).parent / "scripts" / "plain_torch_restart.py"
    result = subprocess.run(
        [
            *TRAINKIT_RUN,
            *rendezvous_flags(rendezvous),
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "3",
            "--monitor-interval",
            "0.5",
            str(script),
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=launcher_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = set(re.findall(r"rank (\d) attempt (\d) value (\d+)", result.stdout))
    assert reports == {(str(r), str(a), "2") for r in (0, 1) for a in range(4)}, result.stdout


def test_workers_die_with_a_sigkilled_launcher(tmp_path: Path) -> None:
    process = start_sleeping_job(tmp_path)
    workers = read_worker_pids(tmp_path)
    assert len(workers) == 2 and all(is_running(pid) for pid in workers)
    try:
        process.kill()  # the launcher alone, as the OOM killer or a node agent would
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(is_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if is_running(pid)]
        assert not survivors, f"workers {survivors} outlived their SIGKILLed launcher"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["module", "no-python"])
def test_module_and_program_workers_keep_torchrun_contract(tmp_path: Path, mode: str) -> None:
    repo = Path(__file__).resolve().parents[2]
    if mode == "module":
        target = ["-m", "tests.integration.scripts.probe_env"]
    else:
        target = ["--no-python", sys.executable, str(PROBE)]
    result = subprocess.run(
        [*TRAINKIT_RUN, "--standalone", "--nproc-per-node", "1", *target, str(tmp_path), "ok"],
        capture_output=True,
        text=True,
        timeout=150,
        env=launcher_env(PYTHONPATH=str(repo)),
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_records(tmp_path)["rank-0-restart-0"]
    assert record["name"] == "__main__"
    assert record["argv"] == [str(PROBE), str(tmp_path), "ok"]
    assert record["path0"] == str(repo if mode == "module" else PROBE.parent)
    assert record["parent_death_signal"] == signal.SIGKILL


def listening_addresses(pid: int) -> list[str]:
    table = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in table.splitlines() if f"pid={pid}," in line]


def test_standalone_stores_listen_on_loopback_only(tmp_path: Path) -> None:
    # torch's --standalone store (and the one it shares with workers) listen on every address.
    process = start_sleeping_job(tmp_path)
    try:
        addresses = listening_addresses(process.pid)
        assert len(addresses) >= 2, addresses  # the rendezvous store and the workers' store
        hosts = {address.rsplit(":", 1)[0] for address in addresses}
        assert hosts <= {"127.0.0.1", "[::1]"}, addresses
    finally:
        stop_group(process)
