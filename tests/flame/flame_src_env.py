"""The flame checkout named by FLAME_SRC: helpers and the fixture, imported by the test modules.

No conftest.py here: a second module named `conftest` would shadow tests/conftest.py for
`from conftest import ...`; shared helpers are in tests/support/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

FLAME_SRC_HOWTO = (
    "set FLAME_SRC to a fla-org/flame checkout at e11e7be (git clone https://github.com/fla-org/flame && "
    "git -C flame checkout e11e7be) to run it"
)


def flame_src() -> Path | None:
    """The flame checkout named by FLAME_SRC, or None."""
    value = os.environ.get("FLAME_SRC")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "flame" / "config_manager.py").is_file():
        raise pytest.UsageError(f"FLAME_SRC={value}: not a fla-org/flame checkout (no flame/config_manager.py)")
    return path


def flame_on_path(needed_for: str = "needs a flame checkout") -> Path:
    """The FLAME_SRC checkout, importable as ``flame``; without FLAME_SRC the test is skipped, saying how to run it."""
    path = flame_src()
    if path is None:
        pytest.skip(f"{needed_for}: {FLAME_SRC_HOWTO}")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(scope="session")
def flame_checkout() -> Path:
    """The FLAME_SRC checkout, importable as ``flame``; skips when FLAME_SRC is unset."""
    return flame_on_path()
