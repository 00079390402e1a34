"""Host adapters: the one place that knows which torchtitan is installed.

``from flame_ext.titan import ValidatingCheckpointManager`` gives the subclass of the installed
torchtitan's ``CheckpointManager``: ``v01`` for 0.1.x (flame's pin: ``job_config``, public ``load()``),
``v03`` for 0.3.x (nested ``Config``, ``_load``/``dcp_load`` hooks). Resolved on first use, so importing
``flame_ext.titan.config03`` or ``v01`` directly does not import the other generation; nothing here
imports torchtitan's trainer, so no triton is needed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ValidatingCheckpointManager", "generation"]


def generation() -> str:
    """'0.1' or '0.3': the installed torchtitan's API generation; a clear ImportError otherwise."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        installed = version("torchtitan")
    except PackageNotFoundError:
        installed = None
    if installed is None:
        raise ImportError("flame_ext.titan needs torchtitan 0.1.x or 0.3.x installed (pip install 'flame-ext[titan]')")
    major_minor = ".".join(installed.split(".")[:2])
    if major_minor in ("0.1", "0.3"):
        return major_minor
    raise ImportError(
        f"torchtitan {installed} is installed; flame-ext's training guard supports the 0.1.x (flame's pin) and 0.3.x "
        "CheckpointManager APIs: install one of those"
    )


def __getattr__(name: str) -> Any:
    if name != "ValidatingCheckpointManager":
        raise AttributeError(f"module 'flame_ext.titan' has no attribute {name!r}")
    if generation() == "0.1":
        from flame_ext.titan.v01 import ValidatingCheckpointManager
    else:
        from flame_ext.titan.v03 import ValidatingCheckpointManager
    return ValidatingCheckpointManager
