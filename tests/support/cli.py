"""Running flame-ext as a user does, and reading what it prints (imported as ``from support.cli import ...``).

They live outside ``conftest.py`` because several test folders have a conftest of their own, and a
plain ``from conftest import ...`` then resolves to whichever was imported first.
"""

from __future__ import annotations

import os
import subprocess
import sys

from flame_ext.io.registry import transformers_major  # noqa: F401  (re-exported for the tests)


def titan_version() -> str | None:
    """'0.1', '0.3', ... of the installed torchtitan, or None."""
    try:
        from importlib.metadata import version

        return ".".join(version("torchtitan").split(".")[:2])
    except Exception:
        return None


def run_cli(
    *args: str, module: str = "flame_ext.cli", env: dict | None = None, timeout: int = 300, **kw
) -> subprocess.CompletedProcess:
    """Run a flame-ext command in a fresh interpreter, as a user would; returns the finished process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, timeout=timeout, **kw
    )


def report_json(text: str) -> dict:
    """Parse a JSON report (``diagnose --json`` output, the guard's logged record, an error record) strictly
    (a NaN or Infinity literal fails) and validate it against the schema shipped in the package."""
    import json

    import jsonschema

    from flame_ext.report import SCHEMA_PATH

    def no_constants(name: str) -> None:
        raise AssertionError(f"the report holds a bare {name}: not strict JSON")

    data = json.loads(text, parse_constant=no_constants)
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))
    return data


def valid_report(data: dict) -> dict:
    """``report_json`` for a report already parsed (e.g. ``Report.to_dict()`` written by a worker process)."""
    import json

    return report_json(json.dumps(data, allow_nan=True))
