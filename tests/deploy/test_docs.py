"""The YAML in the docs is the YAML in deploy/: every ```yaml block of deploy/README.md (and of
README.md once the lead merged that section) follows a `<!-- from: PATH -->` line and equals
PATH or a contiguous run of its lines (dedented), so a changed manifest fails here until the
docs show it."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.deploy.manifests import DEPLOY, ROOT

BLOCK = re.compile(r"(?:<!-- from: (?P<source>\S+) -->\n)?```yaml\n(?P<body>.*?)```", re.S)
DOCS = [DEPLOY / "README.md", ROOT / "README.md"]


def is_excerpt(block: str, source: str) -> bool:
    """``block`` equals a contiguous run of ``source``'s lines after removing their common indent."""
    wanted = block.rstrip("\n").splitlines()
    lines = source.splitlines()
    for start in range(len(lines) - len(wanted) + 1):
        run = textwrap.dedent("\n".join(lines[start : start + len(wanted)])).splitlines()
        if run == wanted:
            return True
    return False


def sourced_blocks(doc: Path) -> list[tuple[str, str]]:
    return [(m["source"], m["body"]) for m in BLOCK.finditer(doc.read_text()) if m["source"]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_yaml_block_names_its_file(doc: Path) -> None:
    """deploy/README.md now; README.md from the merge of its "Deploy on Kubernetes" section on,
    when its older Kubernetes examples must become excerpts of deploy/ too."""
    text = doc.read_text()
    if doc == ROOT / "README.md" and "## Deploy on Kubernetes" not in text:
        pytest.skip(
            "README.md has no Deploy on Kubernetes section yet (deploy/README.md is merged in)"
        )
    blocks = list(BLOCK.finditer(text))
    assert len(blocks) >= 5
    unsourced = [m["body"].splitlines()[0] for m in blocks if not m["source"]]
    assert not unsourced, f"{doc.name}: yaml blocks without a <!-- from: PATH --> line: {unsourced}"


@pytest.mark.parametrize(
    ("doc", "source", "body"),
    [(doc, source, body) for doc in DOCS if doc.exists() for source, body in sourced_blocks(doc)],
    ids=lambda value: value if isinstance(value, str) and "\n" not in value else None,
)
def test_block_equals_its_file(doc: Path, source: str, body: str) -> None:
    path = ROOT / source
    assert path.is_file(), f"{doc.name}: <!-- from: {source} --> names no file"
    assert is_excerpt(body, path.read_text()), (
        f"{doc.name}: the block from {source} is not in that file any more; copy it again"
    )


def test_excerpt_check_can_fail() -> None:
    source = "a:\n  b: 1\n  c: 2\n"
    assert is_excerpt("b: 1\nc: 2\n", source)
    assert not is_excerpt("b: 1\nc: 3\n", source)
