"""``trainkit-run --fork-workers``: restarted workers come from the fork server with torch already
imported, with torchrun's contract kept (argv, stdio, signals, exit codes)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.integration.processes import clean_env, finish, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROBE = Path(__file__).parent / "scripts" / "fork_probe.py"


def test_restarted_workers_are_forked_preloaded_and_keep_the_worker_contract(
    tmp_path: Path,
) -> None:
    command = [sys.executable, "-m", "launchers.run", "--fork-workers", "--standalone"]
    command += ["--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1"]
    launcher = start([*command, str(PROBE), "--lr", "0.1"], clean_env(tmp_path), cwd=tmp_path)
    code, output = finish(launcher, 100, "trainkit-run --fork-workers")

    # The second attempt ran in processes forked from the server: torch was already imported.
    for rank in (0, 1):
        assert f"rank {rank} preloaded=True argv=['--lr', '0.1']" in output, output
        assert f"rank {rank} stderr" in output, output
    # Rank 1's exit code reaches the agent through the bootstrap it monitors...
    assert re.search(r"failed first with exit code 7\b", output), output
    # ...and the agent's SIGTERM to the rest of the group reaches rank 0 through its bootstrap.
    assert "rank 0 got SIGTERM" in output, output
    assert code == 1, output
    # Nothing is left: the server and its socket went with the launcher.
    assert not list(tmp_path.glob("trainkit-fork-*")), output
