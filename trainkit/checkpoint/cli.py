"""``trainkit ckpt list|verify|export <root>``: inspect a checkpoint root, or export a step.

``list`` reads commit records only; ``verify`` re-reads every committed file and checks sizes and
block checksums; ``export`` writes one step as a plain ``.pt`` or ``.safetensors`` file elsewhere.
None of them writes into the root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from trainkit.checkpoint.blocks import BufferPool
from trainkit.checkpoint.commit import read_commit, scan_steps, step_dir_name, verify_step
from trainkit.checkpoint.errors import CorruptCheckpointError, UnsupportedCheckpointError
from trainkit.checkpoint.root import CheckpointRoot

__all__ = ["list_checkpoints", "register", "verify_checkpoints"]

_ROOT_HELP = "checkpoint root: a path or an fsspec URL such as s3://bucket/run"


def register(subparsers: argparse._SubParsersAction) -> None:
    ckpt = subparsers.add_parser("ckpt", help="inspect a checkpoint root (list, verify, export)")
    actions = ckpt.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("list", _run_list, "list steps with their state: committed, partial, corrupt record"),
        ("verify", _run_verify, "re-read every committed file and check sizes and checksums"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("root", help=_ROOT_HELP)
        _add_storage_options(parser)
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "verify":
            parser.add_argument("--step", type=int, default=None, help="verify only this step")
        parser.set_defaults(func=func)
    _register_export(actions)


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default="{}",
        metavar="JSON",
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "..."}}\'',
    )


def _register_export(actions: argparse._SubParsersAction) -> None:
    from trainkit.checkpoint.export import EXPORT_DTYPES, EXPORT_FORMATS

    parser = actions.add_parser(
        "export",
        help="write a committed step as one .pt (torch.load) or .safetensors file",
        description="Export a committed step (checksums verified, any number of saving ranks "
        "joined) as a plain state dict that torch.load(weights_only=True) or safetensors reads.",
    )
    parser.add_argument("root", help=_ROOT_HELP)
    parser.add_argument(
        "step", type=int, nargs="?", default=None, help="step to export (default: newest committed)"
    )
    parser.add_argument(
        "--to", choices=sorted(EXPORT_FORMATS), default="torch", help="file format (default torch)"
    )
    parser.add_argument(
        "--model-only",
        action="store_true",
        help="export only the state under --key (default 'model'), e.g. for sample.py or Hugging Face",
    )
    parser.add_argument(
        "--key", default=None, help="state entry to export (implies --model-only; default 'model')"
    )
    parser.add_argument(
        "--dtype", choices=EXPORT_DTYPES, default=None, help="cast floating-point tensors"
    )
    parser.add_argument(
        "--strip-prefix",
        default=None,
        metavar="PREFIX",
        help="drop PREFIX from the exported keys (DDP's 'module.' and torch.compile's '_orig_mod.' "
        "are already absent: trainkit saves the bare module's keys)",
    )
    parser.add_argument(
        "--out", default=None, help="output file (default step_<n>[-<key>].pt|.safetensors here)"
    )
    _add_storage_options(parser)
    parser.set_defaults(func=_run_export)


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return json.loads(args.storage_options)
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"--storage-options {args.storage_options!r} is not JSON: {error}"
        ) from None


def _store(args: argparse.Namespace) -> CheckpointRoot:
    return CheckpointRoot(args.root, _storage_options(args))


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
    if not results:
        # Verifying nothing is not a success: a wrong path or an empty bucket must fail the check.
        print(
            f"no committed step found at {args.root}; check the path (it must hold step_<n>/ "
            "directories with a COMMIT.json)",
            file=sys.stderr,
        )
        if args.json:
            print("[]")
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results if not args.json else []:
        if result["ok"]:
            print(f"step {result['step']}: ok ({result['bytes'] / 1e6:,.1f} MB verified)")
        else:
            print(f"step {result['step']}: CORRUPT: {result['problem']}")
    return 0 if all(result["ok"] for result in results) else 1


def _run_export(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.errors import CheckpointError
    from trainkit.checkpoint.export import export_checkpoint

    key = args.key or ("model" if args.model_only else None)
    started = time.monotonic()
    try:
        path = export_checkpoint(
            args.root,
            args.out,
            args.step,
            to=args.to,
            key=key,
            dtype=args.dtype,
            strip_prefix=args.strip_prefix,
            storage_options=_storage_options(args),
        )
    except (CheckpointError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"trainkit ckpt export: {message}", file=sys.stderr)
        return 1
    print(
        f"wrote {path} ({os.path.getsize(path) / 1e6:,.1f} MB, {time.monotonic() - started:.1f} s)"
    )
    return 0
