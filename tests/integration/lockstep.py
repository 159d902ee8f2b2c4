"""Resume tests of the shards datasets in real processes: 2 ranks x 2 DataLoader workers through
``trainkit-run`` record the samples they see in lock-step over gloo, stop mid-epoch and save rank 0's
loader state; 3 ranks x 1 worker finish the epoch from it. The worker side (``record_in_lock_step``,
called by each test's script) and the launcher side (``resume_on_a_larger_world``) live here."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tests.integration.processes import clean_env, finish, start

LAUNCH_TIMEOUT_S = 200


def record_in_lock_step(
    make_dataset: Callable[[str, Any], Any], record: Callable[[Mapping[str, Any]], list[int]]
) -> None:
    """The worker: ``argv`` is url, outdir, stop step (-1: the whole epoch), DataLoader workers and
    a state file to resume from ("-": none). Writes ``rank-<r>.json`` (what ``record`` returned for
    each batch, and ``len(loader)``) and, on rank 0, ``state.pt``."""
    import torch
    import torch.distributed as dist

    import trainkit
    from shards import ShardedLoader

    url, outdir, stop, workers, state_in = sys.argv[1:6]
    world = trainkit.init(backend="gloo")
    loader = ShardedLoader(make_dataset(url, world), num_workers=int(workers))
    if state_in != "-":
        loader.load_state_dict(torch.load(state_in, weights_only=True))
    seen: list[int] = []
    for step, batch in enumerate(loader, start=1):
        seen.extend(record(batch))
        counts = torch.tensor([step])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # lock-step, as DDP is
        assert counts.item() == step, "every rank is at the same step"
        if step == int(stop):
            break
    if world.rank == 0:
        torch.save(loader.state_dict(), f"{outdir}/state.pt")
    with open(f"{outdir}/rank-{world.rank}.json", "w") as out:
        json.dump({"seen": seen, "batches": len(loader)}, out)
    trainkit.shutdown()


def trainkit_run() -> list[str]:
    found = shutil.which("trainkit-run", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "launchers.run"]


def launch(
    tmp_path: Path,
    script: Path,
    name: str,
    nproc: int,
    url: str,
    stop: int,
    workers: int,
    state: str,
) -> list[dict[str, Any]]:
    """Runs ``script`` on ``nproc`` ranks of one node; each rank's record."""
    outdir = tmp_path / name
    outdir.mkdir()
    command = [*trainkit_run(), "--standalone", "--nproc-per-node", str(nproc), str(script)]
    command += [url, str(outdir), str(stop), str(workers), state]
    # TMPDIR: records of checked row groups stay in the test's directory
    code, output = finish(start(command, clean_env(tmp_path)), LAUNCH_TIMEOUT_S, f"{name} run")
    assert code == 0, output[-6000:]
    return [json.loads((outdir / f"rank-{rank}.json").read_text()) for rank in range(nproc)]


def resume_on_a_larger_world(
    tmp_path: Path, worker_source: str, url: str, *, stop: int, batch_size: int, num_samples: int
) -> None:
    """2 ranks stop after ``stop`` steps, 3 ranks finish the epoch from rank 0's state: every sample
    is seen at most once, and only the final split's remainder is left out."""
    script = tmp_path / "record_samples.py"
    script.write_text(worker_source)
    first = launch(tmp_path, script, "first", 2, url, stop=stop, workers=2, state="-")
    assert [len(r["seen"]) for r in first] == [stop * batch_size] * 2
    state = str(tmp_path / "first" / "state.pt")
    second = launch(tmp_path, script, "second", 3, url, stop=-1, workers=1, state=state)
    assert len({r["batches"] for r in second}) == 1, "equal batches on every rank"
    seen = np.concatenate([r["seen"] for r in first + second])
    assert len(seen) == len(np.unique(seen)), "no sample twice across the resume"
    remaining = num_samples - 2 * stop * batch_size
    assert len(seen) == num_samples - remaining % (3 * batch_size), (
        "only the final split's remainder is dropped"
    )
