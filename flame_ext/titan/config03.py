"""Switching the guard on in torchtitan 0.3.x: from a config function, or on a stock config by override.

Config function (then ``--checkpoint.validate_initial_load`` and the other fields are ordinary CLI flags,
because tyro reads the fields from the default config's runtime class)::

    from flame_ext.titan.config03 import with_initial_load_guard

    def llama3_8b_guarded() -> Trainer.Config:
        return with_initial_load_guard(llama3_8b(), validate_initial_load=True)

Stock config, no code: ``--override.imports flame_ext.titan.config03.initial_load_guard`` (the guard on,
defaults), or with settings as JSON:
``--override.imports 'flame_ext.titan.config03.initial_load_guard={"initial_load_max_loss_delta": 0.05}'``.
The trainer applies overrides before it builds the checkpointer, so the swap takes effect there.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.config.override import derive, override

from flame_ext.titan.v03 import ValidatingCheckpointManager

__all__ = ["with_initial_load_guard", "initial_load_guard"]

C = TypeVar("C")


def with_initial_load_guard(config: C, **fields: Any) -> C:
    """``config.checkpoint`` becomes the guard's Config, every existing field copied, ``fields`` applied."""
    config.checkpoint = derive(config.checkpoint, ValidatingCheckpointManager.Config, **fields)  # type: ignore[attr-defined]
    return config


@override(target=CheckpointManager.Config, exact=True, description="flame-ext: validate the initial checkpoint load")
def initial_load_guard(cfg: CheckpointManager.Config, **fields: Any) -> CheckpointManager.Config:
    """The ``--override.imports`` factory: the stock checkpoint config with the guard on (unless told off)."""
    fields.setdefault("validate_initial_load", True)
    return derive(cfg, ValidatingCheckpointManager.Config, **fields)
