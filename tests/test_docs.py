"""What the README and docs/ name exists: package files, ``python -m`` modules, and the guard's options."""

from __future__ import annotations

import dataclasses
import re
from importlib.util import find_spec
from pathlib import Path

from flame_ext.guard import GuardConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def mentions(pattern: str) -> set[tuple[str, str]]:
    return {(doc.name, m) for doc in DOCS for m in re.findall(pattern, doc.read_text(encoding="utf-8"))}


def test_every_package_path_named_exists():
    named = mentions(r"(?<![\w/.])((?:flame_ext|tests|bench|configs|patches|requirements)/[\w./-]*\w)")
    assert len(named) > 20
    missing = sorted((doc, path) for doc, path in named if not (REPO / path).exists())
    assert not missing, missing


def test_every_module_run_with_python_m_exists():
    named = mentions(r"python -m (flame_ext(?:\.\w+)+)")
    assert named
    missing = sorted((doc, module) for doc, module in named if find_spec(module) is None)
    assert not missing, missing


def test_the_readmes_option_table_is_the_declaration():
    """One row per guard setting, with its declared default (the table a user copies from)."""
    rows = re.findall(r"^\| `(\w+)` \| `?([^`|]+?)`? \|", (REPO / "README.md").read_text(), re.M)
    table = {name: default for name, default in rows}
    declared = {f.name: f.default for f in dataclasses.fields(GuardConfig)}
    assert set(table) == set(declared)
    assert table == {name: spelled(default) for name, default in declared.items()}


def spelled(value: object) -> str:
    """A default as the README writes it: TOML's true/false, unset for None."""
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
