"""The installed torchtitan's checkpoint manager, built the way its trainer builds it.

One builder for ``flame-ext demo`` and the tests that start a guarded load: the real 0.1 (``job_config``,
flame's pin) or 0.3 (``Config.build``) manager, with real optimizers and LR schedulers over the model parts,
checkpoints in ``base/checkpoint``. Guard settings are set only when given, so without them the manager
is configured as torchtitan's stock one. Nothing here is imported until a manager is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flame_ext.errors import GuardConfigError
from flame_ext.guard import GuardConfig

__all__ = ["TrainState", "TitanTraining", "build_checkpoint_manager"]


class TrainState:
    """flame's TrainState, reduced to the step (a torch Stateful): the ``states={"train_state": ...}`` entry."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


@dataclass
class TitanTraining:
    """A built manager and the optimizers and LR schedulers it checkpoints."""

    manager: Any
    optimizers: Any
    lr_schedulers: Any


@dataclass
class _Settings:
    base: Path
    guard: dict[str, Any]
    initial_load_path: str | None
    full_load: bool
    lr: float
    steps: int
    host: dict[str, Any]


def build_checkpoint_manager(
    parts: list[nn.Module],
    base: Path,
    *,
    guard: Mapping[str, Any] | None = None,
    initial_load_path: str | None = None,
    full_load: bool = False,
    lr: float = 1e-3,
    steps: int = 10,
    pipeline_degree: int = 1,
    sd_adapter: Any = None,
    in_hf: bool = False,
    manager_class: type | None = None,
    host: Mapping[str, Any] | None = None,
) -> TitanTraining:
    """The installed generation's manager over ``parts``: ``manager_class`` (default flame-ext's
    ``ValidatingCheckpointManager``; torchtitan's stock ``CheckpointManager`` for a control run).

    ``guard``: guard settings by ``GuardConfig`` field name. ``initial_load_path`` with ``full_load`` false
    loads model weights only (both generations' default). ``pipeline_degree`` is 0.1's (its manager reads it);
    ``sd_adapter`` and ``in_hf`` are 0.3's (a load straight from HF safetensors). ``host``: the host's own
    checkpoint settings by its field name (``async_mode``, ``keep_latest_k``, ...), over the defaults set here.
    """
    from flame_ext.titan import ValidatingCheckpointManager, generation

    declared = {f.name for f in dataclasses.fields(GuardConfig)}
    unknown = sorted(set(guard or {}) - declared)
    if unknown:
        raise GuardConfigError(f"guard settings {unknown} are not GuardConfig fields ({sorted(declared)})")
    cls = manager_class or ValidatingCheckpointManager
    settings = _Settings(Path(base), dict(guard or {}), initial_load_path, full_load, lr, steps, dict(host or {}))
    if generation() == "0.1":
        return _build01(cls, parts, settings, pipeline_degree)
    return _build03(cls, parts, settings, sd_adapter, in_hf)


def _build01(cls: type, parts: list[nn.Module], s: _Settings, pipeline_degree: int) -> TitanTraining:
    from torchtitan.components.ft import init_ft_manager
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config_manager import JobConfig

    job = JobConfig()
    job.job.dump_folder = str(s.base)
    job.optimizer.lr = s.lr
    job.optimizer.implementation = "for-loop"
    job.lr_scheduler.warmup_steps = 1
    job.training.steps = s.steps
    job.checkpoint.enable_checkpoint = True
    job.checkpoint.keep_latest_k = 0
    job.checkpoint.initial_load_path = s.initial_load_path
    job.checkpoint.initial_load_model_weights_only = not s.full_load
    job.parallelism.pipeline_parallel_degree = pipeline_degree
    for name, value in {**s.host, **s.guard}.items():  # what flame's extended JobConfig carries in [checkpoint]
        setattr(job.checkpoint, name, value)
    ft_manager = init_ft_manager(job)
    optimizers = build_optimizers(parts, job, ft_manager)
    schedulers = build_lr_schedulers(optimizers, job)
    manager = cls(**_trainer_states(parts, optimizers, schedulers), job_config=job, ft_manager=ft_manager)
    return TitanTraining(manager, optimizers, schedulers)


def _build03(cls: Any, parts: list[nn.Module], s: _Settings, sd_adapter: Any, in_hf: bool) -> TitanTraining:
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    optimizers = default_adamw(lr=s.lr).build(model_parts=parts)
    schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=s.steps)
    settings = {
        "enable": True,
        "keep_latest_k": 0,
        "last_save_model_only": False,
        "initial_load_path": s.initial_load_path,
        "initial_load_model_only": not s.full_load,
        "initial_load_in_hf": in_hf,
        **s.host,
    }
    config = cls.Config(**settings, **s.guard)
    manager = config.build(
        **_trainer_states(parts, optimizers, schedulers), sd_adapter=sd_adapter, base_folder=str(s.base)
    )
    return TitanTraining(manager, optimizers, schedulers)


def _trainer_states(parts: list[nn.Module], optimizers: Any, schedulers: Any) -> dict[str, Any]:
    """What both generations' trainers hand their manager: the model parts, optimizers, LR schedulers, the
    train state; no dataloader (a converted checkpoint holds none)."""
    return {
        "dataloader": None,
        "model_parts": parts,
        "optimizers": optimizers,
        "lr_schedulers": schedulers,
        "states": {"train_state": TrainState()},
    }
