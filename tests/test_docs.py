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


def module_map() -> set[str]:
    """The paths the module map of docs/layout.md names (the fenced block under "The package, by concern"):
    one entry a line, a folder's entries indented under it, each named once (merges leave twins)."""
    text = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    block = text.split("## The package, by concern", 1)[1].split("```", 2)[1]
    named: list[str] = []
    stack: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        stack[depth:] = [line.split()[0]]
        named.append("".join(stack).rstrip("/"))
    assert len(named) == len(set(named)), sorted({n for n in named if named.count(n) > 1})  # each on one line
    return set(named)


def test_the_module_map_names_every_module_and_only_modules():
    """Both ways: every module of the package is on the map (a new or renamed one must be added), and every
    name on the map is a file or folder of the package (a removed one must go)."""
    named = module_map()
    package = REPO / "flame_ext"
    modules = {
        str(p.relative_to(REPO))
        for p in package.rglob("*.py")
        if p.name != "__init__.py" and "tiny-olmo2" not in p.parts
    }
    folders = {str(p.parent.relative_to(REPO)) for p in package.rglob("__init__.py")}
    assert sorted(modules - named) == [], "modules missing from docs/layout.md's module map"
    assert sorted(folders - named) == [], "packages missing from docs/layout.md's module map"
    assert sorted(n for n in named if not (REPO / n).exists()) == [], "names on the map that are no module"


def test_the_readme_and_diagnose_md_point_to_the_module_map_instead_of_their_own():
    for doc in ("README.md", "docs/diagnose.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        assert "layout.md" in text, doc
        # A map of their own would list the package's folders as a tree or a table of files.
        assert not re.search(r"^\s+(guard|checks|io)/\s", text, re.M), doc
        assert len(re.findall(r"`flame_ext/checks/\w+\.py`", text)) < 3, doc


# Lab-notebook wording: user docs describe behaviour; figures live in docs/benchmarks.md with their date and machine.
NOTEBOOK = re.compile(
    r"\b(this|that|next|last|the previous) round\b|\bround \d+\b|\bnot done in\b|\btargets? [^.\n]*: (not )?met\b"
    r"|\b(target|goal)s? of issue\b|\bagainst the targets?\b|\bis not met\b|\bnot met in\b|\bissue \d+\b"
    r"|\bthe issue's (target|goal)",
    re.I,
)


def test_no_document_speaks_of_rounds_or_targets():
    found = sorted(
        (doc.name, m.group(0))
        for doc in [*DOCS, REPO / "bench" / "README.md"]
        if doc.exists()
        for m in NOTEBOOK.finditer(doc.read_text(encoding="utf-8"))
    )
    assert found == [], found
