"""Shared test states for checkpoint tests: a small model, optimizer and per-rank objects."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import nn

from trainkit.checkpoint import CheckpointManager
from trainkit.checkpoint.commit import COMMIT_NAME


class Counter:
    """A Stateful per-rank object, like the data loader."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def make_state(seed: int = 0, hidden: int = 32) -> dict[str, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": model,
        "optim": optimizer,
        "loader": Counter(),
        "extras": {"epoch": 0},
        "data_rng": generator,
    }


def train(state: dict[str, object], steps: int) -> None:
    model, optimizer = state["model"], state["optim"]
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["loader"].position += 8


def params(state: dict[str, object]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def manager(root: Path, **kwargs: object) -> CheckpointManager:
    kwargs.setdefault("signals", None)
    return CheckpointManager(root, **kwargs)


def rewrite_commit(step_dir: Path, mutate) -> None:
    """Change a commit record and re-seal it, as a buggy or malicious writer could."""
    outer = json.loads((step_dir / COMMIT_NAME).read_text())
    mutate(outer["record"])
    canonical = json.dumps(outer["record"], sort_keys=True, separators=(",", ":"))
    outer["record_crc32"] = zlib.crc32(canonical.encode())
    (step_dir / COMMIT_NAME).write_text(json.dumps(outer))
