"""Real torchtitan checkpoint managers of the installed generation, built the way their trainers build them.

Nothing here is a stand-in for torchtitan or torch.distributed: ``build_manager`` constructs the real
0.1 (``job_config``) or 0.3 (``Config.build``) manager with real optimizers and LR schedulers, through the
package's own builder (``flame_ext.titan.managers``, which ``flame-ext demo`` uses too).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from flame_ext.guard import GuardConfig
from flame_ext.titan.managers import build_checkpoint_manager

GUARD_FIELDS = tuple(f.name for f in dataclasses.fields(GuardConfig))


def titan_generation() -> str | None:
    """The installed torchtitan's API generation as the package tells it (by capability), None without one."""
    from flame_ext.titan import generation

    try:
        return generation()
    except ImportError:
        return None


def build_manager(
    model: nn.Module | list[nn.Module],
    base: Path,
    *,
    initial_load_path: str | None = None,
    full_load: bool = False,
    pipeline_degree: int = 1,
    **guard: Any,
) -> Any:
    """The installed generation's ValidatingCheckpointManager over ``model`` (or model parts, as pipeline
    parallel gives); checkpoints in ``base/checkpoint``. ``guard`` fields are set only when given, so
    without them the config is the stock one."""
    parts = model if isinstance(model, list) else [model]
    return build_checkpoint_manager(
        parts,
        base,
        guard=guard,
        initial_load_path=initial_load_path,
        full_load=full_load,
        pipeline_degree=pipeline_degree,
    ).manager


def build_manager03_hf(model: nn.Module, base: Path, hf_dir: Path, sd_adapter: Any, **guard: Any) -> Any:
    """0.3 only: an initial load straight from HF safetensors through the model's state-dict adapter."""
    return build_checkpoint_manager(
        [model], base, guard=guard, initial_load_path=str(hf_dir), sd_adapter=sd_adapter, in_hf=True
    ).manager


def save_step(manager: Any, step: int) -> None:
    """A full training checkpoint at ``step``, saved by the manager itself (what a resume finds)."""
    if titan_generation() == "0.1":
        manager.save(curr_step=step, force=True)
    else:
        manager.save(curr_step=step, last_step=True)
