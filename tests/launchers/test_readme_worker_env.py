"""The README's worker-environment row names every variable trainkit-run adds to torchrun's."""

from __future__ import annotations

from pathlib import Path

from launchers.run import SHARED_STORE_VARIABLE
from trainkit.comms import apply_plan
from trainkit.env_vars import APPLIED_VARIABLE, MEMORY_ROOT_VARIABLE, REPLICA_ADDRESS_VARIABLE
from trainkit.metrics.settings import METRICS_DIR_VARIABLE
from trainkit.preemption import EXIT_STATUS_DIR_VARIABLE

README = Path(__file__).resolve().parents[2] / "README.md"


def test_worker_environment_row_names_what_trainkit_run_adds() -> None:
    row = next(
        line
        for line in README.read_text().splitlines()
        if line.startswith("| worker environment |")
    )
    # What run() exports before the workers start. The plan is this machine's: without RDMA (a
    # CPU job) the row names its NCCL variables; with RDMA they depend on the fabric.
    plan = apply_plan({})
    nccl = [] if plan.rdma_usable else [n for n in plan.to_export() if n.startswith("NCCL_")]
    added = {
        EXIT_STATUS_DIR_VARIABLE,
        SHARED_STORE_VARIABLE,
        APPLIED_VARIABLE,
        METRICS_DIR_VARIABLE,
        MEMORY_ROOT_VARIABLE,
        REPLICA_ADDRESS_VARIABLE,
        *nccl,
    }
    missing = sorted(name for name in added if f"`{name}" not in row)
    assert not missing, f"{missing} are missing from the README's worker-environment row"
