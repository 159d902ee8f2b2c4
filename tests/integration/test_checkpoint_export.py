"""``trainkit ckpt export`` and ``load_full_state_dict`` on a checkpoint written by two gloo ranks
(real processes): read back by plain ``torch.load``/safetensors with no trainkit in the loop."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.processes import finish, start
from trainkit.checkpoint import load_full_state_dict
from trainkit.checkpoint.commit import step_dir_name
from trainkit.cli import build_parser

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WRITER = Path(__file__).parents[1] / "trainkit" / "checkpoint" / "scripts" / "export_writer.py"


def load_writer_module():
    spec = importlib.util.spec_from_file_location("export_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint root, reference dir) of step 7 saved by two ranks."""
    base = tmp_path_factory.mktemp("export")
    root, out = base / "ckpt", base / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    code, output = finish(
        start([*TORCHRUN, str(WRITER), str(root), str(out)], env), 180, "the checkpoint writers"
    )
    assert code == 0, output[-4000:]
    data_files = sorted(path.name for path in (root / step_dir_name(7)).glob("*.distcp"))
    assert data_files == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote part of the state
    return root, out


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_model_export_loads_into_a_fresh_module_with_plain_torch(
    written: tuple[Path, Path], tmp_path: Path
) -> None:
    root, out = written
    reference = torch.load(out / "reference.pt", weights_only=True)
    target = tmp_path / "model.pt"
    assert run_cli(["ckpt", "export", str(root), "--model-only", "--out", str(target)]) == 0

    state = torch.load(target, weights_only=True)  # what nanoGPT's sample.py does, minus trainkit
    assert sorted(state) == sorted(reference)  # no DDP "module." prefix
    fresh = load_writer_module().TinyGPT()
    fresh.load_state_dict(state)  # strict
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, reference[name]), name

    from safetensors.torch import load_file

    weights = tmp_path / "model.safetensors"
    argv = ["ckpt", "export", str(root), "7", "--to", "safetensors", "--model-only"]
    assert run_cli([*argv, "--out", str(weights)]) == 0
    loaded = load_file(weights)
    assert loaded.keys() == reference.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name]), name

    half = tmp_path / "model-bf16.safetensors"
    assert run_cli([*argv, "--dtype", "bf16", "--out", str(half)]) == 0
    for name, tensor in load_file(half).items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_full_export_holds_optimizer_and_train_state(
    written: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = written
    target = tmp_path / "full.pt"
    assert run_cli(["ckpt", "export", str(root), "--out", str(target)]) == 0
    state = torch.load(target, weights_only=True)
    assert sorted(state) == ["model", "optimizer", "train"]
    assert state["train"] == torch.load(out / "train.pt", weights_only=True)
    assert state["train"]["iter_num"] == 7
    parameters = sorted(set(state["model"]) - {"position_scale"})  # a buffer: no optimizer state
    assert sorted(state["optimizer"]["state"]) == parameters
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(
        state["optimizer"]["state"]["lm_head.weight"]["exp_avg"],
        load_full_state_dict(root, key="optimizer")["state"]["lm_head.weight"]["exp_avg"],
    )

    # safetensors holds tensors only: the optimizer's plain values are refused, with the way out.
    refused = tmp_path / "full.safetensors"
    assert run_cli(["ckpt", "export", str(root), "--to", "safetensors", "--out", str(refused)]) == 1
    assert "--model-only" in capsys.readouterr().err
    assert not refused.exists()


def test_damaged_file_and_empty_root_fail_with_clear_messages(
    written: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = written
    damaged = tmp_path / "damaged"
    shutil.copytree(root, damaged)
    data = damaged / step_dir_name(7) / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    target = tmp_path / "model.pt"
    assert run_cli(["ckpt", "export", str(damaged), "--model-only", "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert "__1_0.distcp: block 0 checksum mismatch" in err, err
    assert list(tmp_path.glob("model.pt*")) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    for action in ("verify", "export"):
        assert run_cli(["ckpt", action, str(empty)]) == 1
        assert f"no committed step found at {empty}" in capsys.readouterr().err
    assert run_cli(["ckpt", "export", str(root), "5"]) == 1
    assert "step 5 is not committed" in capsys.readouterr().err
