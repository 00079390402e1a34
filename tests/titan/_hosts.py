"""Real torchtitan checkpoint managers of the installed generation, built the way their trainers build them.

Nothing here is a stand-in for torchtitan or torch.distributed: ``build_manager`` constructs the real
0.1 (``job_config``) or 0.3 (``Config.build``) manager with real optimizers and LR schedulers.
``TrainState`` (the demo host's) is the ``states={"train_state": ...}`` entry a trainer passes in
(flame passes its own small Stateful, like it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from flame_ext.commands.demo import TrainState
from flame_ext.guard import GuardConfig

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
    from flame_ext.titan import ValidatingCheckpointManager

    unknown = set(guard) - set(GUARD_FIELDS)
    assert not unknown, unknown
    parts = model if isinstance(model, list) else [model]
    if titan_generation() == "0.1":
        return _build01(ValidatingCheckpointManager, parts, base, initial_load_path, full_load, guard, pipeline_degree)
    return _build03(ValidatingCheckpointManager, parts, base, initial_load_path, full_load, guard)


def _build01(
    cls: Any,
    parts: list[nn.Module],
    base: Path,
    path: str | None,
    full_load: bool,
    guard: dict,
    pipeline_degree: int = 1,
) -> Any:
    from torchtitan.components.ft import FTManager
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config_manager import JobConfig

    job = JobConfig()
    job.job.dump_folder = str(base)
    job.checkpoint.enable_checkpoint = True
    job.checkpoint.keep_latest_k = 0
    job.checkpoint.initial_load_path = path
    job.checkpoint.initial_load_model_weights_only = not full_load
    job.parallelism.pipeline_parallel_degree = pipeline_degree
    for name, value in guard.items():  # what flame's extended JobConfig carries in [checkpoint]
        setattr(job.checkpoint, name, value)
    ft = FTManager(None)
    optimizers = build_optimizers(parts, job, ft)
    schedulers = build_lr_schedulers(optimizers, job)
    return cls(
        dataloader=None,
        model_parts=parts,
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": TrainState()},
        job_config=job,
        ft_manager=ft,
    )


def _build03(
    cls: Any,
    parts: list[nn.Module],
    base: Path,
    path: str | None,
    full_load: bool,
    guard: dict,
    sd_adapter: Any = None,
    in_hf: bool = False,
) -> Any:
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    optimizers = default_adamw(lr=1e-3).build(model_parts=parts)
    schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=10)
    config = cls.Config(
        enable=True,
        keep_latest_k=0,
        last_save_model_only=False,
        initial_load_path=path,
        initial_load_model_only=not full_load,
        initial_load_in_hf=in_hf,
        **guard,
    )
    return config.build(
        dataloader=None,
        model_parts=parts,
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": TrainState()},
        sd_adapter=sd_adapter,
        base_folder=str(base),
    )


def build_manager03_hf(model: nn.Module, base: Path, hf_dir: Path, sd_adapter: Any, **guard: Any) -> Any:
    """0.3 only: an initial load straight from HF safetensors through the model's state-dict adapter."""
    from flame_ext.titan import ValidatingCheckpointManager

    return _build03(
        ValidatingCheckpointManager, [model], base, str(hf_dir), False, guard, sd_adapter=sd_adapter, in_hf=True
    )


def save_step(manager: Any, step: int) -> None:
    """A full training checkpoint at ``step``, saved by the manager itself (what a resume finds)."""
    if titan_generation() == "0.1":
        manager.save(curr_step=step, force=True)
    else:
        manager.save(curr_step=step, last_step=True)
