"""The ``shards`` command: ``shards write | inspect | verify``.

A thin layer over ``write_shards``, ``Manifest`` and ``verify_dataset``; exit status 0 on success,
1 when verify finds problems, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main", "register", "run"]


def _parse_storage_options(text: str | None) -> dict[str, object] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SystemExit(
            f"shards: --storage-options is not JSON ({exc}); e.g. '{{\"anon\": true}}'"
        ) from exc
    if not isinstance(value, dict):
        raise SystemExit("shards: --storage-options must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shards", description="Sharded Arrow datasets for trainkit."
    )
    _add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """``trainkit shards write | inspect | verify``: the same commands under the trainkit CLI."""
    parser = subparsers.add_parser(
        "shards", help="sharded Arrow datasets: write | inspect | verify"
    )
    _add_commands(parser.add_subparsers(dest="command", required=True))
    parser.set_defaults(func=run)


def _add_commands(sub: argparse._SubParsersAction) -> None:
    write = sub.add_parser(
        "write", help="write Parquet/Arrow files (or a directory of them) as shards"
    )
    write.add_argument(
        "sources", nargs="+", help="Parquet or Arrow IPC files or directories, any fsspec URL"
    )
    write.add_argument("dest", help="dataset root to create, any fsspec URL")
    write.add_argument(
        "--format", choices=("parquet", "arrow"), default="parquet", help="shard file format"
    )
    write.add_argument(
        "--bytes-per-shard", type=int, default=None, help="target shard size (default 64 MiB)"
    )
    write.add_argument(
        "--row-group-bytes", type=int, default=None, help="target row group size (default 2 MiB)"
    )
    write.add_argument(
        "--compression", default=None, help="codec (default: snappy for parquet, none for arrow)"
    )
    write.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset at dest"
    )
    write.add_argument(
        "--fixed-lists",
        default=None,
        metavar="COLUMNS",
        help="comma-separated list columns whose lists all have one length to write as fixed-size "
        "lists (2-D tensors), or 'all'",
    )
    write.add_argument("--no-progress", action="store_true", help="no progress bar")
    write.add_argument("--storage-options", default=None, help="JSON object of fsspec options")
    write.set_defaults(handler=_write)

    inspect = sub.add_parser("inspect", help="print a dataset's manifest summary")
    inspect.add_argument("url", help="dataset root, any fsspec URL")
    inspect.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    inspect.add_argument("--storage-options", default=None, help="JSON object of fsspec options")
    inspect.set_defaults(handler=_inspect)

    verify = sub.add_parser(
        "verify", help="read every shard and check sizes, checksums and schemas"
    )
    verify.add_argument("url", help="dataset root, any fsspec URL")
    verify.add_argument("--storage-options", default=None, help="JSON object of fsspec options")
    verify.set_defaults(handler=_verify)


def _write(args: argparse.Namespace) -> int:
    from shards.writer import DEFAULT_BYTES_PER_SHARD, DEFAULT_ROW_GROUP_BYTES, write_shards

    manifest = write_shards(
        args.sources,
        args.dest,
        format=args.format,
        bytes_per_shard=args.bytes_per_shard or DEFAULT_BYTES_PER_SHARD,
        row_group_bytes=args.row_group_bytes or DEFAULT_ROW_GROUP_BYTES,
        compression=args.compression,
        storage_options=_parse_storage_options(args.storage_options),
        progress=not args.no_progress,
        overwrite=args.overwrite,
        fixed_lists=_parse_fixed_lists(args.fixed_lists),
    )
    print(
        f"wrote {manifest.num_rows:,} rows in {len(manifest.shards)} {manifest.format} shard(s), "
        f"{manifest.num_row_groups} row groups, {manifest.num_bytes:,} bytes to {args.dest}"
    )
    return 0


def _parse_fixed_lists(text: str | None) -> bool | list[str] | None:
    if text is None:
        return None
    if text == "all":
        return True
    return [name.strip() for name in text.split(",") if name.strip()]


def _inspect(args: argparse.Namespace) -> int:
    from shards.manifest import Manifest

    manifest = Manifest.load(args.url, _parse_storage_options(args.storage_options))
    if args.json:
        print(json.dumps(manifest.to_json(), indent=1))
        return 0
    print(f"dataset   {args.url}")
    print(f"format    {manifest.format} (manifest version {manifest.format_version})")
    print(f"rows      {manifest.num_rows:,}")
    print(f"bytes     {manifest.num_bytes:,}")
    print(f"shards    {len(manifest.shards)}, row groups {manifest.num_row_groups}")
    print("columns")
    for field in manifest.schema:
        print(f"  {field.name:<24} {field.type}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shards.verify import verify_dataset

    problems = verify_dataset(args.url, _parse_storage_options(args.storage_options))
    for problem in problems:
        print(f"BAD {problem.url}: {problem.problem}")
    if problems:
        print(
            f"{len(problems)} problem(s) in {args.url}; re-run `shards write` to rebuild the dataset"
        )
        return 1
    print(f"OK {args.url}: every shard matches the manifest")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs a parsed ``shards`` command; user errors print one line and exit with status 2."""
    from shards.errors import ShardsError

    try:
        return args.handler(args)
    except ShardsError as exc:
        print(f"shards {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
