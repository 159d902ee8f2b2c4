"""The ``shards`` command surface: write, inspect, verify and their exit codes."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from shards.cli import build_parser, main
from tests.shards.synthetic import make_table


def test_cli_surface_is_pinned():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == ["inspect", "verify", "write"]


def test_write_inspect_verify(tmp_path, capsys):
    pq.write_table(make_table(300), tmp_path / "in.parquet")
    dest = str(tmp_path / "ds")
    assert (
        main(["write", str(tmp_path / "in.parquet"), dest, "--format", "arrow", "--no-progress"])
        == 0
    )
    assert "wrote 300 rows" in capsys.readouterr().out
    assert main(["inspect", dest]) == 0
    out = capsys.readouterr().out
    assert "rows      300" in out and "tokens" in out
    assert main(["verify", dest]) == 0
    assert "OK" in capsys.readouterr().out
    shard = next(name for name in os.listdir(dest) if name.startswith("shard-"))
    with open(os.path.join(dest, shard), "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02")
    assert main(["verify", dest]) == 1
    assert f"BAD {dest}/{shard}" in capsys.readouterr().out
    assert main(["write", str(tmp_path / "in.parquet"), dest, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_registers_under_the_trainkit_command(tmp_path, capsys):
    import argparse

    from shards.cli import register

    parser = argparse.ArgumentParser(prog="trainkit")
    register(parser.add_subparsers(dest="command", required=True))
    pq.write_table(make_table(50), tmp_path / "in.parquet")
    args = parser.parse_args(
        ["shards", "write", str(tmp_path / "in.parquet"), str(tmp_path / "ds"), "--no-progress"]
    )
    assert args.func(args) == 0
    args = parser.parse_args(["shards", "verify", str(tmp_path / "ds")])
    assert args.func(args) == 0
    assert "OK" in capsys.readouterr().out
