"""``trainkit ckpt list|verify`` on a real checkpoint root, registered like trainkit.cli does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from trainkit.checkpoint import CheckpointManager
from trainkit.checkpoint.cli import register
from trainkit.checkpoint.commit import step_dir_name

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trainkit")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_list_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Linear(256, 256)
    with CheckpointManager(tmp_path, async_save=False, signals=None, keep_last=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"model": model})
    (tmp_path / step_dir_name(3)).mkdir()

    assert run_cli(["ckpt", "list", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["status"], r["world_size"]) for r in rows] == [
        (1, "committed", 1),
        (2, "committed", 1),
        (3, "partial", None),
    ]
    assert run_cli(["ckpt", "list", str(tmp_path)]) == 0
    assert "partial" in capsys.readouterr().out

    assert run_cli(["ckpt", "verify", str(tmp_path)]) == 0
    assert "step 2: ok" in capsys.readouterr().out

    data = tmp_path / step_dir_name(2) / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    assert run_cli(["ckpt", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step 1: ok" in out
    assert "step 2: CORRUPT" in out and "__0_0.distcp: block 0 checksum mismatch (" in out
    assert run_cli(["ckpt", "verify", str(tmp_path), "--step", "3"]) == 1
    assert "no commit record" in capsys.readouterr().out
    torch.manual_seed(0)


def test_a_step_of_a_newer_format_is_listed_as_unsupported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.trainkit.checkpoint.states import make_state, manager, rewrite_commit

    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state())
    rewrite_commit(tmp_path / step_dir_name(1), lambda record: record.update(format_version=99))
    assert run_cli(["ckpt", "list", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["step"], row["status"]) for row in rows] == [(1, "unsupported-format")]
    assert run_cli(["ckpt", "verify", str(tmp_path)]) == 1
    assert "format_version 99" in capsys.readouterr().out
