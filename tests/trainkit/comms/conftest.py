"""Fixture machines for the comms tests: trees built by tests/fixtures/sysfs/build_trees.py into a
temporary directory once per test process, each with its machine.json."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import pytest

_built_root: str | None = None


def machines_root() -> str:
    """Where the machine trees are, building them on first use (removed when the process exits)."""
    global _built_root
    if _built_root is None:
        from tests.fixtures.sysfs.build_trees import build_all

        root = tempfile.mkdtemp(prefix="trainkit-sysfs-")
        atexit.register(shutil.rmtree, root, True)
        build_all(root)
        _built_root = root
    return _built_root


@dataclass(frozen=True)
class Machine:
    name: str
    root: str
    env: dict[str, str]
    shm_bytes: int

    @property
    def paths(self) -> dict[str, object]:
        return {"root": self.root, "shm_bytes": self.shm_bytes}


def load_machine(name: str) -> Machine:
    root = os.path.join(machines_root(), name)
    with open(os.path.join(root, "machine.json")) as handle:
        meta = json.load(handle)
    return Machine(name=name, root=root, env=dict(meta["env"]), shm_bytes=int(meta["shm_bytes"]))


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Machine:
    return load_machine(request.param)
