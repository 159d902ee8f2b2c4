"""Collectives: the NCCL/RDMA plan from what the pod was given, the doctor's findings, the benchmark.

Importing this package reads nothing and imports no torch; ``apply_plan`` reads local files only.
"""

from trainkit.comms.apply import (
    APPLIED_VARIABLE,
    REQUIRE_RDMA_VARIABLE,
    CommsPlanError,
    RDMARequiredError,
    apply_plan,
    compute_plan,
)
from trainkit.comms.discovery import HostPaths, PodResources, discover
from trainkit.comms.formulas import algbw_gbps, bus_factor, busbw_gbps
from trainkit.comms.plan import Finding, Plan, Setting, build_plan

__all__ = [
    "APPLIED_VARIABLE",
    "REQUIRE_RDMA_VARIABLE",
    "CommsPlanError",
    "Finding",
    "HostPaths",
    "Plan",
    "PodResources",
    "RDMARequiredError",
    "Setting",
    "algbw_gbps",
    "apply_plan",
    "build_plan",
    "bus_factor",
    "busbw_gbps",
    "compute_plan",
    "discover",
]
