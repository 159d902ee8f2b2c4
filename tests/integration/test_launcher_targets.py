"""trainkit-run against torchrun on what to run and how many: a directory target, an out-of-tree
accelerator's ``--nproc-per-node``, one node in a StatefulSet pod; and a ``k8s`` rendezvous that
cannot start as configured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Each worker writes what `python TARGET` gave it: argv, sys.path[0], __file__, __name__.
RECORDER = """\
import json, os, sys
from pathlib import Path
record = {
    "argv": sys.argv,
    "path0": sys.path[0],
    "file": __file__,
    "name": __name__,
    "local_world_size": os.environ["LOCAL_WORLD_SIZE"],
}
Path(sys.argv[1], "rank-" + os.environ["RANK"] + ".json").write_text(json.dumps(record))
"""

# An out-of-tree accelerator as torch loads one (torch_npu does the same through the
# `torch.backends` entry point): renames PrivateUse1 to "npu" and registers its device module.
FAKE_NPU = """\
import os
import types

import torch


def autoload():
    torch.utils.rename_privateuse1_backend("npu")
    module = types.ModuleType("fake_npu_device")
    count = int(os.environ.get("FAKE_NPU_COUNT", "0"))
    module.is_available = lambda: count > 0
    module.device_count = lambda: count
    torch._register_device_module("npu", module)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_", "KUBERNETES_"))
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "POD_IP"):
        env.pop(name, None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra})
    return env


def launch(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=cwd, env=env)


def records(outdir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(outdir.glob("rank-*.json"))}


def test_a_directory_with_main_runs_as_torchrun_runs_it(tmp_path: Path) -> None:
    # torchrun's worker command is `python -u TARGET ARGS`: plain python is the reference.
    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text(RECORDER)
    for name in ("python", "trainkit"):
        (tmp_path / name).mkdir()
    python = launch(
        [sys.executable, "app", "python"], tmp_path, clean_env(RANK="0", LOCAL_WORLD_SIZE="1")
    )
    assert python.returncode == 0, python.stderr
    result = launch(
        [*TRAINKIT_RUN, "--standalone", "--nproc-per-node", "1", "app", "trainkit"],
        tmp_path,
        clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = records(tmp_path / "python")["rank-0"]
    assert theirs == {
        "argv": ["app", "python"],
        "path0": str(app),
        "file": str(app / "__main__.py"),
        "name": "__main__",
        "local_world_size": "1",
    }
    assert records(tmp_path / "trainkit")["rank-0"] == {**theirs, "argv": ["app", "trainkit"]}


def fake_npu_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "fake_npu-1.0.dist-info").mkdir(parents=True)
    (site / "fake_npu.py").write_text(FAKE_NPU)
    (site / "fake_npu-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-npu\nVersion: 1.0\n"
    )
    (site / "fake_npu-1.0.dist-info" / "entry_points.txt").write_text(
        "[torch.backends]\nfake_npu = fake_npu:autoload\n"
    )
    return site


def test_nproc_per_node_accepts_an_out_of_tree_accelerator_as_torchrun_does(
    tmp_path: Path,
) -> None:
    site = fake_npu_site(tmp_path)
    (tmp_path / "record.py").write_text(RECORDER)
    env = clean_env(PYTHONPATH=f"{REPO}{os.pathsep}{site}", FAKE_NPU_COUNT="2")
    found = {}
    for name, launcher in (("torchrun", TORCHRUN), ("trainkit", TRAINKIT_RUN)):
        (tmp_path / name).mkdir()
        command = [*launcher, "--standalone", "--nproc-per-node", "npu", "record.py", name]
        result = launch(command, tmp_path, env)
        assert result.returncode == 0, result.stderr[-3000:]
        found[name] = {rank: r["local_world_size"] for rank, r in records(tmp_path / name).items()}
    assert found["trainkit"] == found["torchrun"] == {"rank-0": "2", "rank-1": "2"}


def test_nproc_per_node_refused_by_torch_is_a_usage_error_with_its_reason(
    tmp_path: Path,
) -> None:
    # torchrun raises ValueError("npu is not available.") here (a traceback, exit 1); trainkit-run
    # gives the same reason as a usage error. Without the backend, the unit tests compare in-process.
    site = fake_npu_site(tmp_path)
    env = clean_env(PYTHONPATH=f"{REPO}{os.pathsep}{site}", FAKE_NPU_COUNT="0")
    (tmp_path / "record.py").write_text(RECORDER)
    command = ["--standalone", "--nproc-per-node", "npu", "record.py", str(tmp_path)]
    ours = launch([*TRAINKIT_RUN, *command], tmp_path, env)
    assert ours.returncode == 2
    assert "trainkit-run: error: --nproc-per-node 'npu': npu is not available." in ours.stderr
    assert "Traceback" not in ours.stderr
    assert not list(tmp_path.glob("rank-*.json"))


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to give the process a pod's hostname",
)
def test_one_node_in_a_statefulset_pod_runs_like_torchrun(tmp_path: Path) -> None:
    # Pod w-1 of a StatefulSet with a headless Service, and nothing says there is a second node:
    # the launch must not become a k8s rendezvous of one node (which ordinal 1 cannot join).
    (tmp_path / "record.py").write_text(RECORDER)
    env = clean_env(
        KUBERNETES_SERVICE_HOST="10.96.0.1",
        POD_IP="127.0.0.1",
        TRAINKIT_SERVICE="train",
        TRAINKIT_JOB_TOKEN="0123456789abcdef0123456789abcdef",
        TRAINKIT_METRICS_PORT="0",
    )
    launcher = " ".join(TRAINKIT_RUN)
    result = launch(
        [
            "unshare",
            "--uts",
            "sh",
            "-c",
            f"hostname w-1 && exec {launcher} --nproc-per-node 1 record.py .",
        ],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pod defaults off: one node (no node count given)" in result.stderr
    assert "ordinal 1 of a statefulset" in result.stderr
    assert "Traceback" not in result.stderr
    assert records(tmp_path)["rank-0"]["local_world_size"] == "1"


def test_a_k8s_rendezvous_it_cannot_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """More than one node asked for, but no headless Service named: the handler's reason in one
    line, a usage error, no traceback."""
    script = tmp_path / "hi.py"
    script.write_text("print('never runs')\n")
    flags = ["--rdzv-backend", "k8s", "--nnodes", "1:2", "--nproc-per-node", "1"]
    result = subprocess.run(
        [*TRAINKIT_RUN, *flags, "--no-fork-workers", str(script)],
        env=clean_env(TRAINKIT_JOB_TOKEN="a-job-token-of-24-bytes!"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "trainkit-run: k8s rendezvous: no headless Service" in result.stderr
    assert "never runs" not in result.stdout
