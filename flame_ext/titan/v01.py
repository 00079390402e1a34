"""torchtitan 0.1.x adapter (the generation flame pins): a ``CheckpointManager`` that guards the initial load.

0.1 has no load hook below the public ``load()``, which calls ``dcp.load(self._states_to_load(...))``
directly. So ``load()`` decides whether this load is the initial one (the same branches as the host:
``initial_load_path`` into a missing checkpoint folder, or the ``step-0`` folder) and
``_states_to_load`` checks the exact state dict it is about to hand to ``dcp.load``: flat model keys for
a model-weights-only load, ``{"model": ..., "optimizer": ..., ...}`` for a full one. A load of a
``step-N`` folder (N > 0) is a resume: ``_states_to_load`` lets the guard see what the load reads, and the
resume is verified against the record the save left (``guard.resume``).

Saving: the public ``save(curr_step, force)``. The state is turned into state dicts once; the guard records
those (``guard.save_record``: the sums start before a synchronous save, and once ``save()`` has staged an async
one's copy) and the host saves the same objects. A forced last save of model weights
only is recorded after it, from the exported weights the host saved. The record is written when the save
has completed: at once for a synchronous save, by the ``async`` future's callback or at ``_async_wait``,
and for ``async_with_pinned_mem`` (a background process) at ``_async_wait`` or ``close``.

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
from torchtitan.components.checkpoint import MODEL, OPTIMIZER, AsyncMode, CheckpointManager

from flame_ext.errors import GuardConfigError
from flame_ext.guard import (
    GuardConfig,
    InitialLoadGuard,
    LoadCapture,
    StepRecord,
    hf_loss_probe,
    model_state,
    read_record_ahead,
    record_figures,
    record_metrics,
    record_save,
    split_request,
    step_of,
    tied_keys,
    verify_resume,
)
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.training_state import as_state_dicts, flatten_state, group_of
from flame_ext.report import Report

__all__ = ["ValidatingCheckpointManager", "GuardCheckpoint", "JobConfig"]

logger = logging.getLogger(__name__)


class ValidatingCheckpointManager(CheckpointManager):
    """torchtitan 0.1 ``CheckpointManager`` + the flame-ext initial-load guard (``checkpoint.validate_initial_load``).

    ``load()`` must be called on ALL ranks, as the host already requires: the guard's checks hold collectives.
    After a validated load, ``initial_load_report`` holds the report; flame builds its metric logger after
    loading, so ``record_initial_load_metrics(metric_logger)`` logs the step-0 figures once it exists.
    """

    states: dict[str, Any]  # the host's, set in its __init__

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
        self.resume_report: Report | None = None
        self._resume_figures: dict[str, float] = {}
        self._resume_step = 0
        self._capture: LoadCapture | None = None
        self._pending_record: StepRecord | None = None
        super().__init__(dataloader, model_parts, optimizers, lr_schedulers, states, job_config, ft_manager)

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        if not (getattr(self, "enable_checkpoint", False) and self.guard_config.validate_initial_load):
            return super().load(step)
        self._finish_record()  # the load overwrites the tensors a record may still be summing
        target = self._initial_load_target(step)
        if target is None:
            resume = self._resume_target(step)
            return super().load(step) if resume is None else self._resume(step, resume)
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
        return self._create_checkpoint_id(0) if load_step == 0 else None

    def _resume_target(self, step: int) -> str | None:
        """The ``step-N`` folder (N > 0) a resume reads, else None."""
        if not os.path.exists(self.folder):
            return None
        load_step = self._find_load_step() if step == -1 else step
        return self._create_checkpoint_id(load_step) if load_step > 0 else None

    def _resume(self, step: int, checkpoint: str) -> bool:
        self._capture = LoadCapture()
        record = read_record_ahead(self.guard_config, checkpoint)  # while the host loads
        try:
            loaded = super().load(step)  # _states_to_load lets the capture see what the load reads
            capture = self._capture
        finally:
            self._capture = None
        if not loaded:
            return loaded
        entries = [k for k in self.states if k not in self.exclude_from_loading]
        live = [k for k in (MODEL, OPTIMIZER) if k in entries]
        parts = self.states[MODEL].model

        def loaded_state() -> dict[str, Any]:
            state = flatten_state({k: self.states[k] for k in live})  # what the manager would save now
            return {**state, **capture.read([k for k in entries if k not in live])}

        self.resume_report, self._resume_figures = verify_resume(
            self.guard_config,
            checkpoint,
            parts,
            loaded_state,
            groups=lambda key: group_of(key, entries),
            metric_logger=self.metric_logger,
            pipelined=self.pipeline_parallel_degree > 1 or len(parts) > 1,
            record=record,
        )
        self._resume_step = step_of(checkpoint) or 0
        return loaded

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        states = super()._states_to_load(model_only)
        if self._capture is not None and not model_only:
            states = self._capture.wrap(states, live=(MODEL, OPTIMIZER))
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
        """Log the figures of the last validated load (step 0, or the resumed step's ``resume/...``) with a
        metric logger built after loading."""
        if self.initial_load_report is not None and self.initial_load_report.loss is not None:
            record_metrics(metric_logger, self.initial_load_report.loss, self._figures)
        if self._resume_figures:
            record_figures(metric_logger, self._resume_figures, self._resume_step)

    @torch.no_grad()
    def save(self, curr_step: int, force: bool = False) -> None:
        guarded = getattr(self, "enable_checkpoint", False) and self.guard_config.validate_initial_load
        if not guarded or self.ft_manager is not None or not self._should_save(curr_step, force):
            return super().save(curr_step, force)
        checkpoint = self._create_checkpoint_id(curr_step)
        if force and self.last_save_model_weights_only:
            super().save(curr_step, force)  # self.states is now the exported weights it saved, synchronously
            record_save(self.states, step=curr_step, checkpoint=checkpoint).write_when_saved(None)
            return
        if self.async_mode == AsyncMode.ASYNC:
            self._async_wait()  # the previous save first, as the host would (waiting twice is harmless here)
        self._finish_record()
        saved = as_state_dicts(self.states)
        synchronous = force or self.async_mode == AsyncMode.DISABLED  # else summed once save() has staged its copy
        record = record_save(saved, step=curr_step, checkpoint=checkpoint, start=synchronous)
        kept, self.states = self.states, saved  # the host saves exactly the objects recorded
        try:
            super().save(curr_step, force)
        finally:
            self.states = kept
        record.start()
        if synchronous:
            record.write_when_saved(None)
            return
        if self.async_mode == AsyncMode.ASYNC:
            record.write_when_saved(self.async_future)
        self._pending_record = record  # pinned memory: a background process saves; written at the next wait

    def maybe_wait_for_staging(self) -> None:
        super().maybe_wait_for_staging()
        self._finish_record()  # the host calls it before the optimizer step: the sums must end before it

    def _async_wait(self) -> None:
        super()._async_wait()
        self._flush_record()

    def close(self) -> None:
        self._finish_record()  # written by the save's callback, or below, once the save has completed
        super().close()
        self._flush_record()

    def _finish_record(self) -> None:
        """Join the pending record's sums (every rank: a collective); it is written once its save completes."""
        pending = getattr(self, "_pending_record", None)
        if pending is not None:
            pending.finish()

    def _flush_record(self) -> None:
        pending, self._pending_record = getattr(self, "_pending_record", None), None
        if pending is not None:
            pending.flush()


@dataclass
class GuardCheckpoint(GuardConfig):
    """``GuardConfig``'s fields and checks as the ``[checkpoint]`` section of a torchtitan 0.1 job config."""


@dataclass
class JobConfig:
    """For ``--experimental.custom_args_module flame_ext.titan.v01``: adds the guard fields to ``[checkpoint]``."""

    checkpoint: GuardCheckpoint = field(default_factory=GuardCheckpoint)
