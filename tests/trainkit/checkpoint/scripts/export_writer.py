"""Test worker: a nanoGPT-style state (DDP model, AdamW, TrainState) saved by every rank as step 7.

    torchrun --standalone --nproc-per-node 2 export_writer.py ROOT OUT

Rank 0 also writes the reference: OUT/reference.pt (``torch.save`` of the bare module's state dict).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainkit
from trainkit.checkpoint import CheckpointManager, TrainState


class TinyGPT(nn.Module):
    """Token embedding, a norm and a head: the parts of nanoGPT's GPT that have weights."""

    def __init__(self, vocab: int = 64, width: int = 48) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("position_scale", torch.arange(width, dtype=torch.float32))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(self.wte(tokens) * self.position_scale))


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    world = trainkit.init()
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyGPT())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train = TrainState(iter_num=0, best_val_loss=1e9)
    state = {"model": model, "optimizer": optimizer, "train": train}
    with CheckpointManager(root, signals=None, async_save=False) as checkpoints:
        for step in range(1, 8):
            tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
            loss = model(tokens).logsumexp(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train.iter_num = step
            train.best_val_loss = min(train.best_val_loss, float(loss))
        checkpoints.save(7, state)
    if world.is_main:
        torch.save(model.module.state_dict(), out / "reference.pt")
        torch.save(
            {"iter_num": train.iter_num, "best_val_loss": train.best_val_loss}, out / "train.pt"
        )
    trainkit.shutdown()


if __name__ == "__main__":
    main()
