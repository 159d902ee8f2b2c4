"""``World.device``: the CUDA device of the local rank only when CUDA is there and the process
group uses it. CUDA is faked (``torch.cuda.is_available``) because this machine has no GPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from trainkit.world import World

TWO_PER_NODE = World(rank=1, world_size=2, local_rank=1, local_world_size=2)


@pytest.fixture
def gloo_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TWO_PER_NODE.device == torch.device("cpu")


def test_local_rank_gpu_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TWO_PER_NODE.device == torch.device("cuda", 1)
    assert World().device == torch.device("cuda", 0)


def test_cpu_when_the_process_group_is_gloo_only(
    monkeypatch: pytest.MonkeyPatch, gloo_group: None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TWO_PER_NODE.device == torch.device("cpu")
    # What dist reports for trainkit.init()'s "auto" backend on a GPU machine.
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    assert TWO_PER_NODE.device == torch.device("cuda", 1)
