"""Launching real launcher processes from tests: a clean environment, start in a session of its
own, and finish with a deadline that kills the whole session rather than hang the suite."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without launcher variables, the repository importable, temp files in
    ``tmp_path``, one OpenMP thread per process, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TMPDIR"] = str(tmp_path)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start(
    command: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


def finish(
    process: subprocess.Popen[str], timeout_s: float = 150, what: str = "the launcher"
) -> tuple[int, str]:
    """Exit code and output; fails the test (after killing the session) past ``timeout_s``."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=10)
        pytest.fail(f"{what} did not exit within {timeout_s} s:\n{output[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
