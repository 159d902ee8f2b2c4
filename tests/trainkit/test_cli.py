"""The `trainkit` command: subcommands registered by their modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# The checkout under test, so the child imports this code and not an installed copy.
REPO = Path(__file__).resolve().parents[2]


def test_world_subcommand_prints_the_world_from_the_environment() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
    }
    result = subprocess.run(
        [sys.executable, "-c", "from trainkit.cli import main; main()", "world"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    world = json.loads(result.stdout)
    assert (world["rank"], world["world_size"], world["source"]) == (1, 2, "env")


def test_no_subcommand_prints_help_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from trainkit.cli import main; main()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "world" in result.stdout


def test_world_subcommand_names_a_contradictory_environment_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "RANK": "5", "WORLD_SIZE": "2"}
    result = subprocess.run(
        [sys.executable, "-c", "from trainkit.cli import main; main()", "world"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "trainkit world: invalid World from source 'env': rank (5) must be in [0, world_size=2) "
        "(environment: RANK=5, WORLD_SIZE=2)"
    ]
