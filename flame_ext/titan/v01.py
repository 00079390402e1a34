"""torchtitan 0.1.x adapter (the generation flame pins): a ``CheckpointManager`` that guards the initial load.

0.1 has no load hook below the public ``load()``, which calls ``dcp.load(self._states_to_load(...))``
directly. So ``load()`` decides whether this load is the initial one (the same branches as the host:
``initial_load_path`` into a missing checkpoint folder, or the ``step-0`` folder) and
``_states_to_load`` checks the exact state dict it is about to hand to ``dcp.load``: flat model keys for
a model-weights-only load, ``{"model": ..., "optimizer": ..., ...}`` for a full one.

The constructor signature is the host's, and the guard settings are read from ``job_config.checkpoint``
with defaults, so flame's ``train.py`` can swap the class in and a stock JobConfig leaves the guard off.
"""

# No ``from __future__ import annotations`` here: torchtitan 0.1 merges ``JobConfig`` extensions by their
# field types, which must be real classes, not strings.
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torchtitan.components.checkpoint import MODEL, CheckpointManager

from flame_ext.errors import GuardConfigError
from flame_ext.guard import (
    GuardConfig,
    InitialLoadGuard,
    hf_loss_probe,
    model_state,
    record_metrics,
    split_request,
    tied_keys,
)
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.report import Report

__all__ = ["ValidatingCheckpointManager", "GuardCheckpoint", "JobConfig"]

logger = logging.getLogger(__name__)


class ValidatingCheckpointManager(CheckpointManager):
    """torchtitan 0.1 ``CheckpointManager`` + the flame-ext initial-load guard (``checkpoint.validate_initial_load``).

    ``load()`` must be called on ALL ranks, as the host already requires: the guard's checks hold collectives.
    After a validated load, ``initial_load_report`` holds the report; flame builds its metric logger after
    loading, so ``record_initial_load_metrics(metric_logger)`` logs the step-0 figures once it exists.
    """

    def __init__(
        self,
        dataloader: Any,
        model_parts: list[torch.nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        job_config: Any,
        ft_manager: Any,
    ) -> None:
        # Before the host: its __init__ returns early when checkpointing is off, and the guard's settings
        # are checked (bad threshold -> clear error) whether or not this run loads anything.
        self.guard_config = GuardConfig.from_section(job_config.checkpoint)
        self.pipeline_parallel_degree = getattr(getattr(job_config, "parallelism", None), "pipeline_parallel_degree", 1)
        self.metric_logger: Any = None
        self.initial_load_report: Report | None = None
        self._guard: InitialLoadGuard | None = None
        self._figures: dict[str, float] = {}
        super().__init__(dataloader, model_parts, optimizers, lr_schedulers, states, job_config, ft_manager)

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        if not (getattr(self, "enable_checkpoint", False) and self.guard_config.validate_initial_load):
            return super().load(step)
        target = self._initial_load_target(step)
        if target is None:
            return super().load(step)
        parts = self.states[MODEL].model
        if self.pipeline_parallel_degree > 1 or len(parts) > 1:
            raise GuardConfigError(
                "checkpoint.validate_initial_load does not support pipeline parallel (the reference forward pass "
                "would need the pipeline schedule); validate the checkpoint with `flame-ext diagnose --loss` and "
                "set checkpoint.validate_initial_load = false"
            )
        self._guard = InitialLoadGuard(self.guard_config, target, parts)
        try:
            loaded = super().load(step)  # _states_to_load runs the pre-load check
            guard = self._guard
        finally:
            self._guard = None
        if loaded:
            self.initial_load_report = guard.after_load(
                hf_loss_probe(parts[0]),
                metric_logger=self.metric_logger,
                loaded=model_state(self.states[MODEL], guard.model_prefix),
            )
            self._figures = guard.figures
        return loaded

    def _initial_load_target(self, step: int) -> str | None:
        """The folder an initial load reads (mirrors the branches of the host's ``load``), else None."""
        if not os.path.exists(self.folder):
            return self.initial_load_path or None
        load_step = self._find_load_step() if step == -1 else step
        if load_step == 0:
            return self._create_checkpoint_id(0)
        if load_step > 0:
            logger.info(
                "flame-ext: resuming from %s: initial-load validation skipped (it checks only the first load of a run)",
                self._create_checkpoint_id(load_step),
            )
        return None

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        states = super()._states_to_load(model_only)
        guard = self._guard
        if guard is not None:
            requested = split_request(states)
            guard.before_load(
                requested,
                lambda: read_dcp_metadata(guard.checkpoint),
                tied=tied_keys(guard.parts, requested.model_prefix),
            )
        return states

    def record_initial_load_metrics(self, metric_logger: Any) -> None:
        """Log the step-0 figures of the last validated load with a metric logger built after loading."""
        if self.initial_load_report is not None and self.initial_load_report.loss is not None:
            record_metrics(metric_logger, self.initial_load_report.loss, self._figures)


@dataclass
class GuardCheckpoint(GuardConfig):
    """``GuardConfig``'s fields and checks as the ``[checkpoint]`` section of a torchtitan 0.1 job config."""


@dataclass
class JobConfig:
    """For ``--experimental.custom_args_module flame_ext.titan.v01``: adds the guard fields to ``[checkpoint]``."""

    checkpoint: GuardCheckpoint = field(default_factory=GuardCheckpoint)
