"""Fixture machines for the comms tests: trees under tests/fixtures/sysfs plus their machine.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

SYSFS_FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "sysfs")


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
    root = os.path.abspath(os.path.join(SYSFS_FIXTURES, name))
    with open(os.path.join(root, "machine.json")) as handle:
        meta = json.load(handle)
    return Machine(name=name, root=root, env=dict(meta["env"]), shm_bytes=int(meta["shm_bytes"]))


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Machine:
    return load_machine(request.param)
