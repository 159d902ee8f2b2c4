"""Real processes: 2 ranks x 2 DataLoader workers through ``trainkit-run`` read token windows in
lock-step over gloo, stop mid-epoch and save rank 0's state; 3 ranks x 1 worker finish the epoch.
Every window start of the stream is delivered once, each window the stream's tokens."""

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
from tests.shards.test_tokens import documents

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NUM_TOKENS = 12_007
BLOCK, BATCH = 24, 8

WORKER = (
    textwrap.dedent(
        """
    import json, sys, torch, torch.distributed as dist
    import trainkit
    from shards import ShardedLoader, TokenWindowDataset

    url, outdir, stop, workers, state_in = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    world = trainkit.init(backend="gloo")
    dataset = TokenWindowDataset(
        url, column="doc", block_size=__BLOCK__, batch_size=__BATCH__, world=world, seed=5,
        with_index=True,
    )
    loader = ShardedLoader(dataset, num_workers=workers)
    if state_in != "-":
        loader.load_state_dict(torch.load(state_in, weights_only=True))
    seen = []
    for step, batch in enumerate(loader, start=1):
        starts = batch["_index"] * __BLOCK__
        assert torch.equal(batch["doc"][:, 0].long(), starts) and torch.equal(
            batch["doc"][:, -1].long(), starts + __BLOCK__
        ), "a window is the stream's tokens"
        seen.extend(batch["_index"].tolist())
        counts = torch.tensor([step])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # lock-step, as DDP is
        assert counts.item() == step, "every rank is at the same step"
        if step == stop:
            break
    if world.rank == 0:
        torch.save(loader.state_dict(), f"{outdir}/state.pt")
    with open(f"{outdir}/rank-{world.rank}.json", "w") as out:
        json.dump({"windows": seen, "batches": len(loader)}, out)
    trainkit.shutdown()
    """
    )
    .replace("__BLOCK__", str(BLOCK))
    .replace("__BATCH__", str(BATCH))
)


def trainkit_run() -> list[str]:
    found = shutil.which("trainkit-run", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "launchers.run"]


def launch(tmp_path: Path, name: str, nproc: int, url: str, stop: int, workers: int, state: str):
    outdir = tmp_path / name
    outdir.mkdir()
    script = tmp_path / "record_windows.py"
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


def test_two_ranks_then_three_cover_every_window_once(tmp_path):
    url = str(tmp_path / "stream")
    write_shards(documents(NUM_TOKENS), url, format="parquet", row_group_bytes=512, progress=False)
    first = launch(tmp_path, "first", 2, url, stop=9, workers=2, state="-")
    assert [len(r["windows"]) for r in first] == [9 * BATCH, 9 * BATCH]
    second = launch(
        tmp_path, "second", 3, url, stop=-1, workers=1, state=str(tmp_path / "first" / "state.pt")
    )
    assert len({r["batches"] for r in second}) == 1, "equal batches on every rank"
    windows = np.concatenate([r["windows"] for r in first + second])
    assert len(windows) == len(np.unique(windows)), "no window twice across the resume"
    num_windows = (NUM_TOKENS - 1) // BLOCK
    remaining = num_windows - 2 * 9 * BATCH
    assert len(windows) == num_windows - remaining % (3 * BATCH), (
        "only the final split's remainder is dropped"
    )
