"""The package layers (launchers > trainkit > shards) hold, and `lint-imports` catches a wrong-way import.

The contracts live in pyproject.toml; `make lint` runs them. These tests run the same tool on the
tree and on a copy of it with one import pointing the wrong way, so a contract that silently stopped
checking anything would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (it is in the dev extras)"
)


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_tree(dest: Path) -> Path:
    for package in ("trainkit", "shards", "launchers"):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_its_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "wrong_import", "complaint"),
    [
        ("shards/plan.py", "import trainkit.world", "shards is not allowed to import trainkit"),
        (
            "trainkit/world.py",
            "import launchers.run",
            "trainkit is not allowed to import launchers",
        ),
        (
            "trainkit/world.py",
            "import trainkit.checkpoint",
            "trainkit.world is not allowed to import",
        ),
    ],
)
def test_a_wrong_way_import_fails_the_lint(tmp_path, module, wrong_import, complaint):
    tree = copy_tree(tmp_path)
    path = tree / module
    # Inside a function, as the lazy imports in this code base are: they count too.
    path.write_text(path.read_text() + f"\n\ndef _wrong_way():\n    {wrong_import}\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert complaint in result.stdout
