"""Apply the comms plan to an environment: set only what the user left unset, never override.

Called by trainkit-run before workers start and by ``trainkit.init()``; it reads local files only
(no network) and records the names it set so a second call treats them as its own, not the user's.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from trainkit.comms.discovery import HostPaths, discover
from trainkit.comms.plan import Plan, build_plan
from trainkit.env_vars import (
    APPLIED_VARIABLE,
    REQUIRE_RDMA_VARIABLE,
    read_comms_applied,
    read_require_rdma,
)

__all__ = [
    "APPLIED_VARIABLE",
    "REQUIRE_RDMA_VARIABLE",
    "CommsPlanError",
    "RDMARequiredError",
    "apply_plan",
    "compute_plan",
]


class CommsPlanError(ValueError):
    """The pod's collective setup cannot satisfy what was asked of it."""


class RDMARequiredError(CommsPlanError):
    """``TRAINKIT_REQUIRE_RDMA=1`` but the plan falls back to TCP sockets."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        problems = [
            f"[{f.code}] {f.message} (fix: {f.fix})"
            for f in plan.errors
            if f.code != "require-rdma"
        ]
        super().__init__(
            f"{REQUIRE_RDMA_VARIABLE}=1 but collectives would fall back to TCP on this pod: "
            + ("; ".join(problems) or "no RDMA device was given to the pod")
            + f". Run `trainkit doctor` for the full report, or unset {REQUIRE_RDMA_VARIABLE} to accept TCP."
        )

    def __reduce__(self) -> tuple[type[RDMARequiredError], tuple[Plan]]:
        # Errors cross process boundaries pickled (torch gathers worker errors); rebuild from the plan.
        return (type(self), (self.plan,))


def compute_plan(env: MutableMapping[str, str] | None = None, **paths: object) -> Plan:
    """The plan for this pod (or the tree under ``root=``) without changing ``env``."""
    env = os.environ if env is None else env
    resources = discover(HostPaths.from_kwargs(**paths), env)
    return build_plan(resources, env, ours=read_comms_applied(env))


def apply_plan(env: MutableMapping[str, str] | None = None, **paths: object) -> Plan:
    """Compute the plan and set, in ``env`` (default ``os.environ``), each variable the user did not set.

    ``paths`` are ``HostPaths`` fields (``root``, ``sys``, ``dev``, ``shm_bytes``, ...) for reading a
    captured tree. Raises ``RDMARequiredError`` (a ``ValueError``), leaving ``env`` untouched, when
    ``TRAINKIT_REQUIRE_RDMA=1`` and the plan falls back to TCP.
    """
    env = os.environ if env is None else env
    plan = compute_plan(env, **paths)
    if read_require_rdma(env) and not plan.rdma_usable:
        raise RDMARequiredError(plan)
    applied = read_comms_applied(env)
    for name, value in plan.to_export().items():
        if name not in env:
            env[name] = value
            applied.add(name)
    if applied:
        env[APPLIED_VARIABLE] = ",".join(sorted(applied))
    return plan
