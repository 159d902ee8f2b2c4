"""``trainkit ckpt list|verify <root>``: inspect a checkpoint root without loading any state.

``list`` reads commit records only; ``verify`` re-reads every committed file and checks sizes and
block checksums. Neither writes, and neither needs torch.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from trainkit.checkpoint.blocks import BufferPool
from trainkit.checkpoint.commit import read_commit, scan_steps, step_dir_name, verify_step
from trainkit.checkpoint.errors import CorruptCheckpointError, UnsupportedCheckpointError
from trainkit.checkpoint.root import CheckpointRoot

__all__ = ["list_checkpoints", "register", "verify_checkpoints"]


def register(subparsers: argparse._SubParsersAction) -> None:
    ckpt = subparsers.add_parser("ckpt", help="inspect a checkpoint root (list, verify)")
    actions = ckpt.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("list", _run_list, "list steps with their state: committed, partial, corrupt record"),
        ("verify", _run_verify, "re-read every committed file and check sizes and checksums"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument(
            "root", help="checkpoint root: a path or an fsspec URL such as s3://bucket/run"
        )
        parser.add_argument(
            "--storage-options",
            default="{}",
            metavar="JSON",
            help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "..."}}\'',
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "verify":
            parser.add_argument("--step", type=int, default=None, help="verify only this step")
        parser.set_defaults(func=func)


def _store(args: argparse.Namespace) -> CheckpointRoot:
    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"--storage-options {args.storage_options!r} is not JSON: {error}"
        ) from None
    return CheckpointRoot(args.root, options)


def list_checkpoints(store: CheckpointRoot) -> list[dict[str, Any]]:
    """One row per step directory, ascending: step, status, world size, bytes, files, age."""
    committed, partial = scan_steps(store)
    rows: list[dict[str, Any]] = []
    for step in sorted(committed + partial):
        row: dict[str, Any] = {
            "step": step,
            "status": "partial",
            "world_size": None,
            "bytes": None,
            "files": None,
            "created_unix_s": None,
        }
        if step in committed:
            try:
                record = read_commit(store, store.join(step_dir_name(step)), step)
            except CorruptCheckpointError as error:
                row.update(status="corrupt-record", detail=str(error))
            except UnsupportedCheckpointError as error:
                row.update(status="unsupported-format", detail=str(error))
            else:
                row.update(
                    status="committed",
                    world_size=record.world_size,
                    bytes=record.total_bytes,
                    files=len(record.files),
                    created_unix_s=record.created_unix_s,
                )
        rows.append(row)
    return rows


def verify_checkpoints(store: CheckpointRoot, step: int | None = None) -> list[dict[str, Any]]:
    """Check every committed step (or one): ``ok`` or the first problem found, per step."""
    committed, _ = scan_steps(store)
    steps = committed if step is None else [step]
    pool = BufferPool(num_buffers=2)
    results = []
    for current in steps:
        try:
            record = verify_step(store, current, pool)
            results.append({"step": current, "ok": True, "bytes": record.total_bytes})
        except (CorruptCheckpointError, UnsupportedCheckpointError) as error:
            results.append({"step": current, "ok": False, "problem": str(error)})
    return results


def _run_list(args: argparse.Namespace) -> int:
    rows = list_checkpoints(_store(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoint steps under {args.root}")
        return 0
    print(f"{'step':>10}  {'status':<15} {'world':>5} {'size':>12} {'files':>5}  created (UTC)")
    for row in rows:
        created = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["created_unix_s"]))
            if row["created_unix_s"]
            else "-"
        )
        size = f"{row['bytes'] / 1e6:,.1f} MB" if row["bytes"] is not None else "-"
        world = row["world_size"] if row["world_size"] is not None else "-"
        files = row["files"] if row["files"] is not None else "-"
        print(f"{row['step']:>10}  {row['status']:<15} {world:>5} {size:>12} {files:>5}  {created}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    results = verify_checkpoints(_store(args), args.step)
    if args.json:
        print(json.dumps(results, indent=2))
    elif not results:
        print(f"no committed steps under {args.root}")
    for result in results if not args.json else []:
        if result["ok"]:
            print(f"step {result['step']}: ok ({result['bytes'] / 1e6:,.1f} MB verified)")
        else:
            print(f"step {result['step']}: CORRUPT: {result['problem']}")
    return 0 if all(result["ok"] for result in results) else 1
