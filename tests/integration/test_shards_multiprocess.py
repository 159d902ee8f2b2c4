"""Real processes: 2 ranks x 2 DataLoader workers through ``trainkit-run`` record the ids they see;
the run stops mid-epoch, saves rank 0's loader state, and 3 ranks x 1 worker finish the epoch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shards import write_shards
from tests.shards.synthetic import make_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NUM_ROWS = 3000
BATCH = 16

WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    import trainkit
    from shards import ShardedDataset, ShardedLoader

    url, outdir, stop, workers, state_in = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    world = trainkit.init(backend="gloo")
    dataset = ShardedDataset(url, batch_size=__BATCH__, world=world, seed=11)
    loader = ShardedLoader(dataset, num_workers=workers)
    if state_in != "-":
        loader.load_state_dict(torch.load(state_in, weights_only=True))
    seen = []
    for step, batch in enumerate(loader, start=1):
        assert torch.equal(batch["tokens"][:, 0], (batch["id"] * 4).int())
        seen.extend(batch["id"].tolist())
        counts = torch.tensor([step])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # lock-step, as DDP is
        assert counts.item() == step, "every rank is at the same step"
        if step == stop:
            break
    if world.rank == 0:
        torch.save(loader.state_dict(), f"{outdir}/state.pt")
    with open(f"{outdir}/rank-{world.rank}.json", "w") as out:
        json.dump({"ids": seen, "batches": len(loader), "world": world.world_size}, out)
    trainkit.shutdown()
    """
).replace("__BATCH__", str(BATCH))


def trainkit_run() -> list[str]:
    found = shutil.which("trainkit-run", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "launchers.run"]


def launch(
    tmp_path: Path, name: str, nproc: int, url: str, stop: int, workers: int, state: str
) -> list[dict]:
    outdir = tmp_path / name
    outdir.mkdir()
    script = tmp_path / "record_ids.py"
    script.write_text(WORKER)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env["TMPDIR"] = str(tmp_path)  # records of checked row groups stay in the test's directory
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [
            *trainkit_run(),
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            str(script),
            url,
            str(outdir),
            str(stop),
            str(workers),
            state,
        ],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((outdir / f"rank-{rank}.json").read_text()) for rank in range(nproc)]


def test_two_ranks_two_workers_then_three_ranks_deliver_each_sample_once(tmp_path):
    url = str(tmp_path / "data")
    write_shards(
        make_table(NUM_ROWS),
        url,
        format="arrow",
        row_group_bytes=2048,
        bytes_per_shard=16384,
        progress=False,
    )

    first = launch(tmp_path, "first", 2, url, stop=30, workers=2, state="-")
    assert [len(r["ids"]) for r in first] == [30 * BATCH, 30 * BATCH]

    second = launch(
        tmp_path, "second", 3, url, stop=-1, workers=1, state=str(tmp_path / "first" / "state.pt")
    )
    assert len({r["batches"] for r in second}) == 1, "equal batches on every rank"
    ids = np.concatenate([r["ids"] for r in first + second])
    assert len(ids) == len(np.unique(ids)), "no sample twice across the resume"
    remaining = NUM_ROWS - 2 * 30 * BATCH
    assert len(ids) == NUM_ROWS - remaining % (3 * BATCH), (
        "only the final split's remainder is dropped"
    )
