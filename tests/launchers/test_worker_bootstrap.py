"""The worker bootstrap: parent-death signal, the race check, and torchrun's worker contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.worker_bootstrap import bootstrap_argv

SCRIPT = """import ctypes, json, os, sys
signum = ctypes.c_int(0)
ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "name": __name__, "signal": signum.value}))
"""


def bootstrap(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launchers.worker_bootstrap", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_script_runs_as_main_with_its_argv_path_and_parent_death_signal(tmp_path: Path) -> None:
    script = tmp_path / "sub" / "train.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    result = bootstrap(
        *bootstrap_argv(os.getpid(), "script", str(script), ["--lr", "1"]), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record == {
        "argv": [str(script), "--lr", "1"],
        "path0": str(script.parent),
        "name": "__main__",
        "signal": signal.SIGKILL,
    }


def test_worker_whose_launcher_already_died_kills_itself(tmp_path: Path) -> None:
    # The launcher died between fork and prctl: the parent pid is no longer the expected one.
    script = tmp_path / "train.py"
    script.write_text("open('ran', 'w').close()\n")
    result = bootstrap(
        *bootstrap_argv(os.getpid() + 1_000_000, "script", str(script), []), cwd=tmp_path
    )
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "ran").exists()


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode 'python'; expected one of script, module, exec"):
        bootstrap_argv(1, "python", "x.py", [])


def test_forked_worker_gets_the_same_contract_and_falls_back_without_a_server(
    tmp_path: Path,
) -> None:
    from launchers.fork_server import ForkServer

    script = tmp_path / "sub" / "train.py"
    script.parent.mkdir()
    script.write_text(SCRIPT.replace('"signal"', '"torch": "torch" in sys.modules, "signal"'))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    expected = {
        "argv": [str(script), "--lr", "1"],
        "path0": str(script.parent),
        "name": "__main__",
        "signal": signal.SIGKILL,
    }
    # Nobody listening: the bootstrap runs the script itself.
    argv = bootstrap_argv(os.getpid(), "script", str(script), ["--lr", "1"], fork_server="/none")
    result = bootstrap(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {**expected, "torch": False}

    server = ForkServer(os.getpid(), env)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(server.socket_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        argv = bootstrap_argv(
            os.getpid(), "script", str(script), ["--lr", "1"], fork_server=server.socket_path
        )
        result = bootstrap(*argv, cwd=tmp_path)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {**expected, "torch": True}
