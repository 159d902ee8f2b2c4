"""The nanoGPT-style worked example end to end, as a user runs it: prepare the tokens, train under
trainkit-run with two processes, SIGTERM part-way (exit 75 well inside the grace period), resume to
the end with every iteration's loss bit-identical to an uninterrupted run, export the weights and
generate from them with code that imports neither trainkit nor shards."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.processes import REPO, clean_env, finish, start
from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "nanogpt_style"
ITERS = 24
GRACE_S = 60


def losses(path: Path) -> dict[int, str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return {int(step): loss for step, loss in (line.split() for line in lines)}


def train_command(data: Path, out: Path, log: Path) -> list[str]:
    launcher = [sys.executable, "-m", "launchers.run", "--standalone", "--nproc-per-node", "2"]
    flags = ["--max-iters", str(ITERS), "--batch-size", "4", "--save-every", "1000"]
    paths = ["--data", str(data), "--out-dir", str(out), "--loss-log", str(log)]
    return [*launcher, str(EXAMPLE / "train.py"), *paths, *flags]


def test_nanogpt_style_example_resumes_bit_exactly_and_exports_weights_plain_torch_loads(
    tmp_path: Path,
) -> None:
    env = clean_env(tmp_path, TRAINKIT_GRACE_PERIOD_S=str(GRACE_S))
    data = tmp_path / "data"
    prepared = subprocess.run(
        [sys.executable, str(EXAMPLE / "prepare.py"), str(data), "--documents", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert prepared.returncode == 0, prepared.stderr

    code, output = finish(
        start(train_command(data, tmp_path / "whole", tmp_path / "whole.log"), env),
        timeout_s=180,
        what="the uninterrupted run",
    )
    assert code == 0, output[-3000:]
    reference = losses(tmp_path / "whole.log")
    assert sorted(reference) == list(range(1, ITERS + 1))

    out, log = tmp_path / "ckpt", tmp_path / "split.log"
    first = start(train_command(data, out, log), env)
    deadline = time.monotonic() + 120
    while len(losses(log)) < 8:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code, output = finish(first, timeout_s=GRACE_S + 30, what="the preempted run")
    took_s = time.monotonic() - signalled
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert took_s < GRACE_S / 2, f"the preemption took {took_s:.1f} s of a {GRACE_S} s grace period"
    saved = max(losses(log))
    assert saved < ITERS, "the run ended before the signal: nothing was resumed"
    assert f"preemption save of step {saved} committed" in output

    code, output = finish(
        start(train_command(data, out, log), env), timeout_s=180, what="the resumed run"
    )
    assert code == 0, output[-3000:]
    assert f"from iteration {saved}" in output
    assert losses(log) == reference  # every iteration's loss, to the last bit

    weights = tmp_path / "model.pt"
    export = ["ckpt", "export", str(out), "--model-only", "--to", "torch", "--out", str(weights)]
    exported = subprocess.run(
        [sys.executable, "-m", "trainkit", *export],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    sample = (
        "import runpy, sys\n"
        f"sys.argv = ['sample.py', {str(weights)!r}, '--meta', {str(data / 'meta.json')!r}]\n"
        f"runpy.run_path({str(EXAMPLE / 'sample.py')!r}, run_name='__main__')\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('trainkit', 'shards'))\n"
        "assert not leaked, leaked\n"
    )
    sampled = subprocess.run(
        [sys.executable, "-c", sample],
        env=env,
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("the "), sampled.stdout
