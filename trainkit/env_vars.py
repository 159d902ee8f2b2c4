"""The ``TRAINKIT_*`` variables a pod spec sets: exactly one parser each, and their defaults.

Every reader takes the environment as a mapping, never changes it, and raises ``ValueError`` naming
the variable, its value and the fix. Exceptions owned elsewhere: ``TRAINKIT_GRACE_PERIOD_S`` and
``TRAINKIT_EXIT_STATUS_DIR`` (``trainkit.exit_codes``), ``TRAINKIT_METRICS_*`` (``trainkit.metrics``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "APPLIED_VARIABLE",
    "CLUSTER_DOMAIN_VARIABLE",
    "DEFAULT_RDZV_PORT",
    "DEFAULT_REPLICA_PORT",
    "MEMORY_ROOT_VARIABLE",
    "NNODES_VARIABLE",
    "PODS_PER_JOB_VARIABLE",
    "RDZV_PORT_VARIABLE",
    "RDZV_STORE_VARIABLE",
    "REPLICA_ADDRESS_VARIABLE",
    "REPLICA_PORT_VARIABLE",
    "REQUIRE_RDMA_VARIABLE",
    "RUN_ID_VARIABLE",
    "SERVICE_VARIABLE",
    "SUBDOMAIN_VARIABLE",
    "WORKLOAD_KINDS",
    "WORKLOAD_VARIABLE",
    "NodeCount",
    "parse_nnodes",
    "read_cluster_domain",
    "read_comms_applied",
    "read_memory_root",
    "read_nnodes",
    "read_pods_per_job",
    "read_rdzv_port",
    "read_rdzv_store",
    "read_replica_address",
    "read_replica_port",
    "read_require_rdma",
    "read_run_id",
    "read_service",
    "read_subdomain",
    "read_workload",
]

#: torch's c10d rendezvous default port, so ``--rdzv-endpoint svc`` means the same port as with c10d.
DEFAULT_RDZV_PORT = 29400

#: The peer replica server's port (checkpoint memory tier): next to the rendezvous port's range.
DEFAULT_REPLICA_PORT = 29410

#: What ``TRAINKIT_WORKLOAD`` may force when the hostname alone is ambiguous.
WORKLOAD_KINDS = ("statefulset", "indexed-job", "jobset", "pytorchjob")

NNODES_VARIABLE = "TRAINKIT_NNODES"
RDZV_PORT_VARIABLE = "TRAINKIT_RDZV_PORT"
RDZV_STORE_VARIABLE = "TRAINKIT_RDZV_STORE"
REPLICA_PORT_VARIABLE = "TRAINKIT_REPLICA_PORT"
RUN_ID_VARIABLE = "TRAINKIT_RUN_ID"
SERVICE_VARIABLE = "TRAINKIT_SERVICE"
SUBDOMAIN_VARIABLE = "TRAINKIT_SUBDOMAIN"
CLUSTER_DOMAIN_VARIABLE = "TRAINKIT_CLUSTER_DOMAIN"
WORKLOAD_VARIABLE = "TRAINKIT_WORKLOAD"
PODS_PER_JOB_VARIABLE = "TRAINKIT_PODS_PER_JOB"
#: Set to 1 to make a comms plan that falls back to TCP an error.
REQUIRE_RDMA_VARIABLE = "TRAINKIT_REQUIRE_RDMA"
#: The pod-local directory (under /dev/shm) holding memory-tier snapshots; trainkit-run sets it.
MEMORY_ROOT_VARIABLE = "TRAINKIT_MEMORY_ROOT"
#: ``host:port`` of this pod's peer-replica server (in the trainkit-run agent); trainkit-run sets it.
REPLICA_ADDRESS_VARIABLE = "TRAINKIT_REPLICA_ADDRESS"
#: Comma-separated names trainkit set in this environment (so re-applying knows they are its own).
APPLIED_VARIABLE = "TRAINKIT_COMMS_APPLIED"


@dataclass(frozen=True)
class NodeCount:
    """A number of nodes (pods): fixed (``min_nodes == max_nodes``) or an elastic range."""

    min_nodes: int
    max_nodes: int

    @property
    def is_fixed(self) -> bool:
        return self.min_nodes == self.max_nodes

    def __str__(self) -> str:
        """torchrun's ``--nnodes`` spelling: ``4`` or ``2:4``."""
        if self.is_fixed:
            return str(self.min_nodes)
        return f"{self.min_nodes}:{self.max_nodes}"


def _text(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value, or None when unset or blank (a blank entry in a pod spec means unset)."""
    return env.get(name, "").strip() or None


def _is_decimal(text: str) -> bool:
    # str.isdigit also accepts superscripts and other scripts' digits; pod specs use ASCII.
    return text.isascii() and text.isdigit()


def parse_nnodes(raw: str, name: str) -> NodeCount:
    """``N`` or ``MIN:MAX`` (positive integers, MIN <= MAX) from the variable ``name``."""
    parts = [part.strip() for part in raw.strip().split(":")]
    if len(parts) not in (1, 2) or not all(_is_decimal(p) and int(p) > 0 for p in parts):
        raise ValueError(
            f"{name}={raw!r}: expected N or MIN:MAX with positive integers, e.g. 4 or 2:4; "
            "set it to the number of pods of the job"
        )
    low, high = int(parts[0]), int(parts[-1])
    if low > high:
        raise ValueError(
            f"{name}={raw!r}: the minimum is above the maximum; write MIN:MAX, e.g. {high}:{low}"
        )
    return NodeCount(low, high)


def read_nnodes(env: Mapping[str, str]) -> NodeCount | None:
    """``TRAINKIT_NNODES``: the job's number of pods (``N`` or ``MIN:MAX``); None when unset."""
    raw = _text(env, NNODES_VARIABLE)
    return None if raw is None else parse_nnodes(raw, NNODES_VARIABLE)


def read_rdzv_port(env: Mapping[str, str]) -> int:
    """``TRAINKIT_RDZV_PORT``: the rendezvous store's port; default ``DEFAULT_RDZV_PORT`` (29400)."""
    raw = _text(env, RDZV_PORT_VARIABLE)
    if raw is None:
        return DEFAULT_RDZV_PORT
    if not _is_decimal(raw) or not 0 < int(raw) < 65536:
        raise ValueError(
            f"{RDZV_PORT_VARIABLE}={raw!r}: expected a port number in 1..65535; "
            f"unset it for the default {DEFAULT_RDZV_PORT}"
        )
    return int(raw)


def read_replica_port(env: Mapping[str, str]) -> int:
    """``TRAINKIT_REPLICA_PORT``: the peer replica server's port; default ``DEFAULT_REPLICA_PORT``."""
    raw = _text(env, REPLICA_PORT_VARIABLE)
    if raw is None:
        return DEFAULT_REPLICA_PORT
    if not _is_decimal(raw) or not 0 < int(raw) < 65536:
        raise ValueError(
            f"{REPLICA_PORT_VARIABLE}={raw!r}: expected a port number in 1..65535; "
            f"unset it for the default {DEFAULT_REPLICA_PORT}"
        )
    return int(raw)


def read_rdzv_store(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_RDZV_STORE``: the Service of a separate ``trainkit rdzv-store`` pod, or None."""
    return _text(env, RDZV_STORE_VARIABLE)


def read_run_id(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_RUN_ID``: the rendezvous id (``--rdzv-id``), or None."""
    return _text(env, RUN_ID_VARIABLE)


def read_service(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_SERVICE``: the headless Service listing the job's pods, or None."""
    return _text(env, SERVICE_VARIABLE)


def read_subdomain(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_SUBDOMAIN``: the pod's subdomain when /etc/hosts does not show it, or None."""
    return _text(env, SUBDOMAIN_VARIABLE)


def read_cluster_domain(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_CLUSTER_DOMAIN``: the cluster's DNS zone (``cluster.local``), or None."""
    raw = _text(env, CLUSTER_DOMAIN_VARIABLE)
    return None if raw is None else raw.rstrip(".") or None


def read_workload(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_WORKLOAD``: one of ``WORKLOAD_KINDS`` (case-insensitive), or None."""
    raw = _text(env, WORKLOAD_VARIABLE)
    if raw is None:
        return None
    if raw.lower() not in WORKLOAD_KINDS:
        raise ValueError(
            f"{WORKLOAD_VARIABLE}={raw.lower()!r}: expected one of {', '.join(WORKLOAD_KINDS)}; "
            "unset it to tell the workload from the hostname"
        )
    return raw.lower()


def read_pods_per_job(env: Mapping[str, str]) -> int:
    """``TRAINKIT_PODS_PER_JOB``: pods per replicated Job of a JobSet (its parallelism); default 1."""
    raw = _text(env, PODS_PER_JOB_VARIABLE)
    if raw is None:
        return 1
    if not _is_decimal(raw) or int(raw) < 1:
        raise ValueError(
            f"{PODS_PER_JOB_VARIABLE}={raw!r} must be a positive integer; set it to the "
            "replicated Job's parallelism"
        )
    return int(raw)


def read_require_rdma(env: Mapping[str, str]) -> bool:
    """``TRAINKIT_REQUIRE_RDMA``: ``1`` makes a TCP fallback an error; ``0`` or unset accepts TCP."""
    raw = _text(env, REQUIRE_RDMA_VARIABLE)
    if raw is None or raw == "0":
        return False
    if raw == "1":
        return True
    raise ValueError(
        f"{REQUIRE_RDMA_VARIABLE}={raw!r}: expected 1 (fail when collectives would use TCP) "
        "or 0 (accept TCP)"
    )


def read_comms_applied(env: Mapping[str, str]) -> set[str]:
    """``TRAINKIT_COMMS_APPLIED``: the variables an earlier ``apply_plan`` set in this environment."""
    return {name for name in env.get(APPLIED_VARIABLE, "").split(",") if name}


def read_memory_root(env: Mapping[str, str]) -> str | None:
    """``TRAINKIT_MEMORY_ROOT``: where memory-tier snapshots live (a /dev/shm directory), or None."""
    return _text(env, MEMORY_ROOT_VARIABLE)


def read_replica_address(env: Mapping[str, str]) -> tuple[str, int] | None:
    """``TRAINKIT_REPLICA_ADDRESS``: ``host:port`` of the pod's replica server, or None when unset."""
    raw = _text(env, REPLICA_ADDRESS_VARIABLE)
    if raw is None:
        return None
    host, _, port = raw.rpartition(":")
    if not host or not _is_decimal(port) or not 0 < int(port) < 65536:
        raise ValueError(
            f"{REPLICA_ADDRESS_VARIABLE}={raw!r}: expected HOST:PORT (e.g. 10.0.0.5:29600); "
            "trainkit-run sets it, unset it to replicate nothing"
        )
    return host.strip("[]"), int(port)
