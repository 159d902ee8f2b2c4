"""Plain values in the state come back into the caller's own objects after ``restore``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.trainkit.checkpoint.states import make_state, manager
from trainkit.checkpoint import TrainState

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


@dataclass
class LoopConfig:
    lr: float = 1e-3
    warmup: int = 10


@dataclass(frozen=True)
class Frozen:
    seed: int = 0


def test_restore_updates_the_callers_objects_in_place(tmp_path: Path) -> None:
    train = TrainState(iter_num=3, best_val_loss=1.25)
    history = {"losses": [2.0, 1.5]}
    seen = [1, 2]
    config = LoopConfig(lr=3e-4, warmup=5)
    state = {
        **make_state(),
        "train": train,
        "history": history,
        "seen": seen,
        "config": config,
        "frozen": Frozen(seed=7),
        "iter_num": 3,
    }
    with manager(tmp_path, async_save=False) as checkpoints:
        checkpoints.save(3, state)

    train.iter_num, train.best_val_loss = 0, 1e9
    history["losses"].append(9.0)
    seen.clear()
    config.lr = 1.0
    state.update(frozen=Frozen(), iter_num=0)
    with manager(tmp_path) as checkpoints:
        assert checkpoints.restore(state) == 3

    assert state["train"] is train and train == TrainState(iter_num=3, best_val_loss=1.25)
    assert state["history"] is history and history == {"losses": [2.0, 1.5]}
    assert state["seen"] is seen and seen == [1, 2]
    assert state["config"] is config and config == LoopConfig(lr=3e-4, warmup=5)
    assert state["frozen"] == Frozen(seed=7)  # frozen: replaced by a copy with the saved fields
    assert state["iter_num"] == 3  # an int cannot change in place: read it from the state


def test_train_state_keeps_attributes_the_checkpoint_lacks(tmp_path: Path) -> None:
    with manager(tmp_path, async_save=False) as checkpoints:
        checkpoints.save(1, {"train": TrainState(iter_num=1, tokens=torch.tensor([5]))})
    train = TrainState(iter_num=0, tokens=torch.tensor([0]), added_later="x")
    with manager(tmp_path) as checkpoints:
        assert checkpoints.restore({"train": train}) == 1
    assert train.iter_num == 1 and torch.equal(train.tokens, torch.tensor([5]))
    assert train.added_later == "x"
    assert repr(TrainState(iter_num=1)) == "TrainState(iter_num=1)"
