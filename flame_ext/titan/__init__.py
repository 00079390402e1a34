"""Host adapters: the one place that knows which torchtitan is installed.

``from flame_ext.titan import ValidatingCheckpointManager`` gives the subclass of the installed
torchtitan's ``CheckpointManager``: ``v01`` for the 0.1 API (flame's pin: ``job_config``, public ``load()``),
``v03`` for the 0.3 API (nested ``Config``, ``_load``/``dcp_load`` hooks), which PyPI's 0.3.0 and torchtitan
main (from August 2026, whose package still calls itself 0.2.2 and has no ``components.checkpoint`` module)
both have. The generation is told by what the installed torchtitan offers, not by its version string.
Resolved on first use, so importing ``flame_ext.titan.config03`` or ``v01`` directly does not import the other
generation; nothing here imports torchtitan's trainer, so no triton is needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

__all__ = ["ValidatingCheckpointManager", "generation"]

_INSTALL_HINT = (
    "flame-ext's training guard supports torchtitan's 0.1 CheckpointManager API (flame's pin, torchtitan 0.1.x) "
    "and its 0.3 API (torchtitan 0.3.x and main): install one of those (pip install 'flame-ext[titan]')"
)


def _manager_class(module: str) -> type | None:
    """``module.CheckpointManager`` when that module exists; its own import errors propagate."""
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # torchtitan itself is not installed
        return None
    return getattr(importlib.import_module(module), "CheckpointManager", None) if found else None


def generation() -> str:
    """'0.1' or '0.3': the API generation of the installed torchtitan's ``CheckpointManager``; a clear ImportError
    when torchtitan is missing or offers neither API."""
    manager = _manager_class("torchtitan.components.checkpointer")
    if manager is not None and all(hasattr(manager, hook) for hook in ("Config", "_load", "dcp_load")):
        return "0.3"
    manager = manager or _manager_class("torchtitan.components.checkpoint")
    if manager is None:
        raise ImportError(f"no torchtitan CheckpointManager is importable: {_INSTALL_HINT}")
    if "job_config" in inspect.signature(manager).parameters and hasattr(manager, "_states_to_load"):
        return "0.1"
    raise ImportError(f"the installed torchtitan's CheckpointManager has neither API the guard uses: {_INSTALL_HINT}")


def __getattr__(name: str) -> Any:
    if name != "ValidatingCheckpointManager":
        raise AttributeError(f"module 'flame_ext.titan' has no attribute {name!r}")
    if generation() == "0.1":
        from flame_ext.titan import v01

        return v01.ValidatingCheckpointManager
    from flame_ext.titan import v03

    return v03.ValidatingCheckpointManager
