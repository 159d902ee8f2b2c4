"""The commit protocol on an S3-compatible server (moto on loopback): same guarantees as on disk."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from tests.fixtures.s3 import S3Server, s3_server
from trainkit.checkpoint import CheckpointManager
from trainkit.checkpoint.cli import register
from trainkit.checkpoint.commit import COMMIT_NAME, step_dir_name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def make_state(seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    return {
        "model": model,
        "optim": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "extras": {"seed": seed},
    }


def step_once(state: dict[str, object]) -> None:
    loss = state["model"](torch.randn(4, 64)).pow(2).mean()
    state["optim"].zero_grad()
    loss.backward()
    state["optim"].step()


def params(state: dict[str, object]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def test_commit_semantics_on_s3(s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket()
    root = f"s3://{bucket}/runs/a"
    options = s3_server.storage_options
    fs = s3_server.filesystem()
    state = make_state(0)
    with CheckpointManager(root, storage_options=options, signals=None, keep_last=2) as ckpt:
        assert ckpt.restore(state) is None
        expected = {}
        for step in (1, 2, 3):
            step_once(state)
            ckpt.save(step, state, block=step == 2)  # async and blocking both
            expected[step] = params(state)
        ckpt.wait()
        assert ckpt.committed_steps() == [2, 3]  # retention deleted step 1 on the store

    # An uncommitted step (files, no record) is invisible; a damaged newest falls back.
    fs.pipe_file(f"{bucket}/runs/a/{step_dir_name(4)}/__0_0.distcp", b"partial")
    fresh = make_state(7)
    assert CheckpointManager(root, storage_options=options, signals=None).restore(fresh) == 3
    assert all(
        torch.equal(fresh_value, expected[3][key]) for key, fresh_value in params(fresh).items()
    )

    record_path = f"{bucket}/runs/a/{step_dir_name(3)}/{COMMIT_NAME}"
    fs.pipe_file(record_path, fs.cat_file(record_path)[:50])
    fresh = make_state(8)
    with pytest.warns(UserWarning, match="skipping checkpoint step 3: .*unreadable commit record"):
        assert CheckpointManager(root, storage_options=options, signals=None).restore(fresh) == 2
    assert all(
        torch.equal(fresh_value, expected[2][key]) for key, fresh_value in params(fresh).items()
    )

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["ckpt", "verify", root, "--json", "--storage-options", json.dumps(options)]
    )
    assert args.func(args) == 1  # step 3's record is damaged; step 2 verifies


def test_unwritable_bucket_is_a_clear_error(s3_server: S3Server) -> None:
    from trainkit.checkpoint import CheckpointNotWritableError

    # Writability is checked at the first save: restoring needs no write access.
    ckpt = CheckpointManager(
        "s3://no-such-bucket-tk/x", storage_options=s3_server.storage_options, signals=None
    )
    with pytest.raises(
        CheckpointNotWritableError, match=r"s3://no-such-bucket-tk/x is not writable"
    ):
        ckpt.save(1, {"extras": {"step": 1}})
