"""The ``trainkit`` command: one subcommand per concern, each registered by the module that owns it.

Modules listed in ``COMMAND_MODULES`` expose ``register(subparsers)``; they are imported only when
the command runs, so ``import trainkit`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

COMMAND_MODULES: tuple[str, ...] = (
    "trainkit.cli",
    "trainkit.doctor",
    "trainkit.comms.cli",
    "trainkit.k8s.cli",
    "trainkit.checkpoint.cli",
    "shards.cli",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="print the World this process would join, as JSON")
    world.set_defaults(func=_print_world)


def _print_world(args: argparse.Namespace) -> int:
    from trainkit.world import World

    try:
        world = World.from_env()
    except ValueError as error:  # a contradictory environment: its message names the variables
        print(f"trainkit world: {error}", file=sys.stderr)
        return 1
    print(json.dumps(world.as_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from trainkit import __version__

    parser = argparse.ArgumentParser(prog="trainkit", description="trainkit runtime tools")
    parser.add_argument("--version", action="version", version=f"trainkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    sys.exit(args.func(args))
