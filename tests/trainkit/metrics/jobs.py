"""Helpers for integration tests that run the metrics test job under a launcher and read /metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "JOB",
    "job_env",
    "kill_job",
    "parse_exposition",
    "series_keys",
    "start_job",
    "stop_job",
    "value",
    "wait_until",
]

JOB = Path(__file__).parent / "scripts" / "metrics_job.py"
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def job_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    for name in (
        "OMP_NUM_THREADS",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "KUBERNETES_SERVICE_HOST",
    ):
        env.pop(name, None)
    env.update(extra)
    return env


def start_job(
    launcher: list[str], args: list[str], outdir: Path, env: dict[str, str], mode: str = "ok"
) -> subprocess.Popen[str]:
    with (outdir / "launcher.log").open("w") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            [*launcher, *args, str(JOB), str(outdir), mode],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # one process group: stop_job can end workers too
        )


def stop_job(process: subprocess.Popen[str], outdir: Path, timeout_s: float = 30.0) -> int:
    """Ask the job to finish (stop file), wait; kill its whole process group if it does not."""
    (outdir / "stop").write_text("1")
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def kill_job(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def parse_exposition(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample line of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not an exposition line: {line!r}"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def series_keys(text: str) -> set[str]:
    return set(parse_exposition(text))


def value(samples: dict[str, float], name: str) -> float | None:
    matches = [v for key, v in samples.items() if key == name or key.startswith(name + "{")]
    assert len(matches) <= 1, f"{name}: {len(matches)} series, expected one per pod"
    return matches[0] if matches else None


def wait_until(
    condition: Callable[[], object], timeout_s: float, what: str, log: Path | None = None
) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    detail = (
        f"\nlauncher log:\n{log.read_text()[-4000:]}" if log is not None and log.exists() else ""
    )
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{detail}")
