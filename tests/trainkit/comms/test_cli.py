"""`trainkit bench collectives`: measure in place inside any launched world, else start local ranks."""

from __future__ import annotations

import argparse

import pytest

from trainkit.comms import bench
from trainkit.comms import cli as bench_cli

WORLD_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "TORCHELASTIC_RUN_ID",
    "JOB_COMPLETION_INDEX",
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainkit")
    bench_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def where_it_runs(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    for name in (*WORLD_VARIABLES, "PET_NNODES", "PET_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ran: list[str] = []
    monkeypatch.setattr(bench, "run_in_world", lambda args: ran.append("in place") or 0)
    monkeypatch.setattr(
        bench_cli.subprocess, "call", lambda command: ran.append("local ranks") or 0
    )
    assert bench_cli.run_collectives_command(parse(["bench", "collectives"])) == 0
    return ran[0]


def test_a_bare_process_starts_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert where_it_runs(monkeypatch, {}) == "local ranks"


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "1", "WORLD_SIZE": "2"},
        # A TrainJob pod started without a launcher: the world is in PET_*, not RANK/WORLD_SIZE.
        {"PET_NNODES": "2", "PET_NODE_RANK": "1"},
    ],
)
def test_inside_any_world_it_measures_in_place(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    assert where_it_runs(monkeypatch, env) == "in place"
