"""``load_full_state_dict`` / ``export_checkpoint`` in one process: entries, keys and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.trainkit.checkpoint.states import manager
from trainkit.checkpoint import (
    NoCommittedStepError,
    TrainState,
    export_checkpoint,
    load_full_state_dict,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


class Wrapped(nn.Module):
    """A wrapper whose own prefix ("inner.") is not one that DCP drops at save."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)


def test_entries_prefixes_and_refusals(tmp_path: Path) -> None:
    model = Wrapped()
    table = torch.arange(6.0).reshape(2, 3)
    with manager(tmp_path, async_save=False) as checkpoints:
        checkpoints.save(1, {"model": model, "table": table, "train": TrainState(iter_num=1)})
        checkpoints.save(2, {"model": model, "table": table * 2, "train": TrainState(iter_num=2)})

    newest = load_full_state_dict(tmp_path)
    assert newest["train"] == {"iter_num": 2} and torch.equal(newest["table"], table * 2)
    assert load_full_state_dict(tmp_path, 1, key="train") == {"iter_num": 1}
    stripped = load_full_state_dict(tmp_path, key="model", strip_prefix="inner.")
    assert sorted(stripped) == ["bias", "weight"]
    assert torch.equal(stripped["weight"], model.inner.weight.detach())

    from safetensors.torch import load_file

    path = export_checkpoint(
        tmp_path, tmp_path / "table.safetensors", 1, to="safetensors", key="table"
    )
    assert torch.equal(load_file(path)["table"], table)

    with pytest.raises(
        KeyError, match=r"no entry 'optimizer' \(it has \['model', 'table', 'train'\]\)"
    ):
        load_full_state_dict(tmp_path, key="optimizer")
    with pytest.raises(ValueError, match="dtype 'int4' is not one of bf16, fp16, fp32"):
        export_checkpoint(tmp_path, dtype="int4")
    with pytest.raises(
        NoCommittedStepError, match=r"step 3 is not committed .* \(committed: \[1, 2\]\)"
    ):
        load_full_state_dict(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000000001",
        "step_0000000002",
        "table.safetensors",
    ]
