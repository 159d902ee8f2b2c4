"""Training scripts shaped like nanoGPT's train.py, as real processes: a module-level loop whose
loader iterator (with worker processes) is still alive when the script ends must exit promptly,
under trainkit-run and bare; a SIGTERM preemption must not wait out the grace period; and the
fetch-ahead loop resumed after the agreed save trains on exactly the batches of an uninterrupted run."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shards import ShardedDataset, write_shards
from tests.integration.processes import clean_env, finish, start
from tests.shards.synthetic import make_table, write_table_dataset
from trainkit.exit_codes import EXIT_PREEMPTED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BATCH = 64  # 3000 rows / (2 ranks x 64): 23 steps per epoch
GRACE_S = 60

# module level on purpose: the loader iterator and its workers are alive when the script ends
NANOGPT_SHAPED = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import trainkit
    from shards import ShardedDataset, ShardedLoader
    from trainkit.checkpoint import CheckpointManager, exit_preempted

    url, checkpoint_dir, log_path, max_steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    world = trainkit.init(backend="gloo")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    dataset = ShardedDataset(url, batch_size=__BATCH__, world=world, seed=3)
    loader = ShardedLoader(dataset, num_workers=1, prefetch_ahead=True)
    checkpoints = CheckpointManager(checkpoint_dir, interval_steps=7)
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    start = checkpoints.restore(state) or 0
    log = open(f"{log_path}-{world.rank}.jsonl", "a")
    batches = loader.batches()
    batch = next(batches)  # fetched before the loop, as nanoGPT does
    for step in range(start + 1, max_steps + 1):
        loss = model(batch["weight"][:, None]).square().mean()
        log.write(json.dumps([step, batch["id"].tolist()]) + "\\n")
        log.flush()
        batch = next(batches)  # the next batch, fetched during the forward pass
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(0.01)
        checkpoints.maybe_save(step, state)
        if checkpoints.should_stop:
            checkpoints.close()
            trainkit.shutdown()
            exit_preempted()
    checkpoints.close()
    trainkit.shutdown()
    """
).replace("__BATCH__", str(BATCH))

BARE = textwrap.dedent(
    """
    import sys
    from shards import ShardedDataset, ShardedLoader

    dataset = ShardedDataset(sys.argv[1], batch_size=16)
    with_workers = iter(ShardedLoader(dataset, num_workers=2))
    next(with_workers)
    in_process = ShardedLoader(ShardedDataset(sys.argv[1], batch_size=16)).batches()
    next(in_process)
    direct = iter(ShardedDataset(sys.argv[1], batch_size=16))
    next(direct)
    print("left with three iterators alive", flush=True)
    """
)


@dataclass(frozen=True)
class FakeWorld:
    rank: int
    world_size: int


def read_log(path: Path) -> dict[int, list[int]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return {step: ids for step, ids in map(json.loads, lines)}


def uninterrupted(url: str, rank: int, num_steps: int) -> list[list[int]]:
    """What each step of an uninterrupted run trains on: plain iteration, epoch after epoch."""
    dataset = ShardedDataset(url, batch_size=BATCH, world=FakeWorld(rank, 2), seed=3)
    ids: list[list[int]] = []
    while len(ids) < num_steps:
        dataset.set_epoch(len(ids) // len(dataset))
        ids.extend(batch["id"].tolist() for batch in dataset)
    return ids[:num_steps]


def test_a_bare_script_exits_with_a_loader_iterator_alive(tmp_path: Path) -> None:
    url = str(tmp_path / "data")
    write_shards(make_table(3000), url, format="arrow", row_group_bytes=2048, progress=False)
    script = tmp_path / "bare.py"
    script.write_text(BARE)
    process = start([sys.executable, str(script), url], clean_env(tmp_path))
    code, output = finish(process, timeout_s=60, what="the bare script")
    assert code == 0 and "left with three iterators alive" in output, output[-3000:]
    assert "Exception ignored" not in output, output[-3000:]


def test_nanogpt_shaped_script_is_preempted_promptly_and_resumes_batch_for_batch(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "data")
    write_table_dataset(url)
    script = tmp_path / "train.py"
    script.write_text(NANOGPT_SHAPED)
    checkpoints, env = tmp_path / "ckpt", clean_env(tmp_path, TRAINKIT_GRACE_PERIOD_S=str(GRACE_S))

    def command(log: str, max_steps: int) -> list[str]:
        run = [sys.executable, "-m", "launchers.run", "--standalone", "--nproc-per-node", "2"]
        return [*run, str(script), url, str(checkpoints), str(tmp_path / log), str(max_steps)]

    first = start(command("first", 10**6), env)
    try:
        deadline = time.monotonic() + 120
        while min(len(read_log(tmp_path / f"first-{rank}.jsonl")) for rank in (0, 1)) < 5:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code, output = finish(first, timeout_s=GRACE_S + 30, what="the preempted run")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    took_s = time.monotonic() - signalled
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert took_s < GRACE_S / 2, f"the preemption took {took_s:.1f} s of a {GRACE_S} s grace period"
    first_logs = [read_log(tmp_path / f"first-{rank}.jsonl") for rank in (0, 1)]
    saved = max(first_logs[0])
    assert max(first_logs[1]) == saved and f"preemption save of step {saved} committed" in output

    second = start(command("second", saved + 30), env)  # crosses at least one epoch boundary
    code, output = finish(second, timeout_s=120, what="the resumed run, ending normally")
    assert code == 0, output[-3000:]
    assert "Exception ignored" not in output, output[-3000:]
    for rank in (0, 1):
        trained = {**first_logs[rank], **read_log(tmp_path / f"second-{rank}.jsonl")}
        assert sorted(trained) == list(range(1, saved + 31))
        assert [trained[step] for step in sorted(trained)] == uninterrupted(url, rank, saved + 30)


def _sleeping_worker(init: Callable[[int], None], ready: Any, go: Any, survived: Any) -> None:
    init(0)
    ready.set()
    go.wait(60)
    survived.set()
    time.sleep(60)


def test_loader_workers_ignore_sigterm_only_while_their_iteration_lives() -> None:
    from shards.loader import _PreemptionSafeWorkerInit

    ended = torch.zeros(1, dtype=torch.bool).share_memory_()
    context = multiprocessing.get_context("fork")
    ready, go, survived = context.Event(), context.Event(), context.Event()
    init = _PreemptionSafeWorkerInit(None, ended)
    worker = context.Process(target=_sleeping_worker, args=(init, ready, go, survived), daemon=True)
    worker.start()
    try:
        assert ready.wait(60)
        os.kill(worker.pid, signal.SIGTERM)  # elastic's SIGTERM to the group, mid-iteration
        go.set()
        assert survived.wait(60), f"the worker died of SIGTERM (exit code {worker.exitcode})"
        ended[0] = True  # the loader ended the iteration
        worker.terminate()  # what DataLoader and multiprocessing do to a worker still alive
        worker.join(60)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(10)
