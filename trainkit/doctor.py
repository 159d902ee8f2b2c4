"""``trainkit doctor``: explain this pod's collective setup on one screen (or as ``--json``).

Identity and peers come from ``trainkit.k8s.report``; the comms plan and the preflight findings
from ``trainkit.comms``. It reads local files and resolves peers; it never changes the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

from trainkit.doctor_shm import format_shm_section, shm_section

__all__ = ["collect_report", "format_report", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="explain this pod's identity, peers and NCCL/RDMA plan, with fixes for problems",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--root",
        default="/",
        help="read sys/, dev/, proc/ under this directory (a captured tree; default /)",
    )
    doctor.add_argument(
        "--no-peers", action="store_true", help="skip the identity/peers section (no DNS)"
    )
    doctor.add_argument(
        "--timeout-s", type=float, default=5.0, help="peer lookup timeout (default 5)"
    )
    doctor.set_defaults(func=run_doctor)


def _identity_section(env: Mapping[str, str], timeout_s: float) -> dict[str, object]:
    from trainkit.k8s.report import describe_pod

    try:
        return {"available": True, "report": describe_pod(dict(env), timeout_s=timeout_s)}
    except Exception as error:  # the doctor reports every failure instead of dying on the first
        return {"available": False, "reason": f"{type(error).__name__}: {error}"}


def _torch_section() -> dict[str, object]:
    try:
        import torch
    except ImportError as error:
        return {"available": False, "reason": str(error)}
    section: dict[str, object] = {
        "version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        section["num_gpus"] = torch.cuda.device_count()
        try:
            section["nccl_version"] = ".".join(str(part) for part in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError):
            section["nccl_version"] = None
    return section


def collect_report(
    env: Mapping[str, str] | None = None,
    *,
    root: str = "/",
    peers: bool = True,
    timeout_s: float = 5.0,
    **paths: object,
) -> dict[str, object]:
    """Everything ``trainkit doctor`` shows, as plain data.

    A variable the plan cannot parse (``TRAINKIT_REQUIRE_RDMA=yes``) gives ``plan`` None, the
    message in ``plan_error`` and ``ok`` False, instead of an exception.
    """
    from trainkit.comms import compute_plan

    env = dict(os.environ if env is None else env)
    report: dict[str, object]
    try:
        plan = compute_plan(env, root=root, **paths)
    except ValueError as error:  # a malformed variable: name it and still show the other sections
        report = {"plan": None, "plan_error": str(error), "plan_text": f"ERROR   {error}"}
        ok = False
    else:
        report = {"plan": plan.as_dict(), "plan_text": plan.format()}
        ok = not plan.errors
    if peers:
        report["identity"] = _identity_section(env, timeout_s)
    report["torch"] = _torch_section()
    report["shm"] = shm_section(root)
    report["ok"] = ok
    return report


def format_report(report: Mapping[str, object]) -> str:
    lines: list[str] = []
    identity = report.get("identity")
    if isinstance(identity, Mapping):
        lines.append("== identity and peers")
        if identity.get("available"):
            from trainkit.k8s.report import format_pod_report

            lines.append(format_pod_report(identity["report"]))
        else:
            lines.append(f"  {identity.get('reason')}")
    torch_info = report.get("torch", {})
    if isinstance(torch_info, Mapping) and "version" in torch_info:
        extra = (
            f", {torch_info.get('num_gpus')} GPU(s), NCCL {torch_info.get('nccl_version')}"
            if torch_info.get("cuda_available")
            else ", CUDA not available"
        )
        lines.append(f"== torch {torch_info['version']}{extra}")
    shm = report.get("shm")
    if isinstance(shm, Mapping):
        lines.append(format_shm_section(shm))
    lines.append("== collectives plan")
    lines.append(str(report["plan_text"]))
    lines.append(
        "== verdict: " + ("ok" if report.get("ok") else "problems found (see ERROR lines)")
    )
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    report = collect_report(root=args.root, peers=not args.no_peers, timeout_s=args.timeout_s)
    if args.json:
        json.dump(
            {k: v for k, v in report.items() if k != "plan_text"}, sys.stdout, indent=2, default=str
        )
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1
