"""torchtitan 0.3.x adapter: a ``CheckpointManager`` whose nested ``Config`` carries the guard's fields.

0.3 loads through two hooks: ``_load`` picks what to load, ``dcp_load(state_dict, checkpoint_id, from_hf,
from_quantized)`` loads it. ``dcp_load`` sees the exact state dict and checkpoint, so the pre-load check
runs there: a ``checkpoint_id`` that is ``<folder>/step-N`` with N > 0 is a resume (what it reads is
captured, and ``_load`` verifies it against the record the save left, ``guard.resume``); anything else
(``step-0``, ``initial_load_path``, the HF assets folder) is the initial load. ``_load`` runs the post-load
checks once the host has loaded.

Saving goes through ``dcp_save(state_dict, checkpoint_id, async_mode, ...)``: the state is turned into state
dicts once, recorded (``guard.save_record``), and the same objects saved; the record is written when the
save has completed (at once, or by the future's callback, or at ``_wait_for_saving``). HF exports
(``last_save_in_hf``) are not recorded: no resume reads them.

For ``initial_load_in_hf`` the request is translated the way the host translates it (``sd_adapter.to_hf``,
on meta copies: no compute, no collectives) and compared with the safetensors headers the adapter's
storage reader sees; keys the adapter maps nowhere would keep their initial values, so they are reported.

The step-0 forward pass is the host's own (``post_dataloading_process``, ``loss_fn``) when the Trainer is
reachable. torchtitan main (August 2026 on) folds the batch into the token dimension: its native models take
tokens and positions of shape ``[T]`` (rows packed, a document boundary wherever positions restart) and return
``[T, V]``; 0.3.0 takes ``[B, L]``. The reference rows are handed over in the installed host's layout.

Switching it on: ``flame_ext.titan.config03`` (a config-function helper and an ``--override.imports``
factory). Importing this module needs no triton.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchtitan.components.checkpointer import MODEL, OPTIMIZER, CheckpointManager
from torchtitan.config import TrainingConfig
from torchtitan.protocols.model import BaseModel

from flame_ext.errors import GuardConfigError
from flame_ext.guard import (
    IGNORE_INDEX,
    GuardConfig,
    InitialLoadGuard,
    LoadCapture,
    LossProbe,
    Range,
    RequestedLoad,
    StepRecord,
    hf_loss_probe,
    host_config,
    meta_copy,
    model_state,
    read_record_ahead,
    record_save,
    rows_of,
    split_request,
    step_of,
    tied_keys,
    verify_resume,
)
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.specs import TensorSpec, dtype_name
from flame_ext.io.training_state import as_state_dicts, flatten_state, group_of
from flame_ext.report import Problem, Report

__all__ = ["ValidatingCheckpointManager"]

logger = logging.getLogger(__name__)

# The change that folded the batch into the token dimension also renamed training.seq_len to max_context_length:
# that field is how the installed host says which layout its native models take.
FOLDS_BATCH = "max_context_length" in TrainingConfig.__dataclass_fields__


class ValidatingCheckpointManager(CheckpointManager):
    """torchtitan 0.3 ``CheckpointManager`` + the flame-ext initial-load guard (``checkpoint.validate_initial_load``).

    ``load()`` must run on ALL ranks (the host requires it already): the guard's checks hold collectives.
    """

    Config = host_config(
        CheckpointManager.Config, qualname="ValidatingCheckpointManager.Config", module=__name__
    )  # the guard's fields (GuardConfig), checked when the config is built

    def __init__(self, config: CheckpointManager.Config, **kwargs: Any) -> None:
        self.guard_config = GuardConfig.from_section(config)
        self.initial_load_report: Report | None = None
        self._guard: InitialLoadGuard | None = None
        self._loading = False
        self._from_hf = False
        self._resume: tuple[str, LoadCapture, Any] | None = None
        self.resume_report: Report | None = None
        self._pending_record: StepRecord | None = None
        super().__init__(config, **kwargs)

    def _load(self, step: int = -1) -> bool:
        if not self.guard_config.validate_initial_load:
            return super()._load(step)
        self._finish_record()  # the load overwrites the tensors a record may still be summing
        self._loading, self._guard, self._from_hf, self._resume = True, None, False, None
        try:
            loaded = super()._load(step)  # dcp_load below runs the pre-load check, or captures a resume
            guard, resume = self._guard, self._resume
        finally:
            self._loading, self._guard, self._resume = False, None, None
        if loaded and resume is not None:
            self._verify_resume(*resume)
        if loaded and guard is not None:
            probe, multiple, max_positions = self._loss_probe(guard.parts)
            trainer = self.states.get("train_state")
            with torch.no_grad():
                self.initial_load_report = guard.after_load(
                    probe,
                    position_multiple=multiple,
                    max_positions=max_positions,
                    metric_logger=getattr(trainer, "metrics_processor", None),
                    loaded=self._loaded_state(guard.fingerprints),
                )
        return loaded

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if self._loading and self._is_resume(checkpoint_id):
            capture = LoadCapture()
            state_dict = capture.wrap(state_dict, live=(OPTIMIZER,))  # model tensors are re-read live
            self._resume = (checkpoint_id, capture, read_record_ahead(self.guard_config, checkpoint_id))
        elif self._loading:
            self._guard = self._check_before(state_dict, checkpoint_id, from_hf, from_quantized)
            self._from_hf = from_hf
        super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

    def _verify_resume(self, checkpoint: str, capture: LoadCapture, record: Any) -> None:
        entries = [k for k in self.states if k not in self.exclude_from_loading and k != MODEL]
        parts = self.states[MODEL].model
        trainer = self.states.get("train_state")

        def loaded_state() -> dict[str, Any]:
            state = dict(self.states[MODEL].state_dict())  # what the manager would save now
            if OPTIMIZER in entries:
                state.update(flatten_state({OPTIMIZER: self.states[OPTIMIZER]}))
            return {**state, **capture.read([k for k in entries if k != OPTIMIZER])}

        self.resume_report, _ = verify_resume(
            self.guard_config,
            checkpoint,
            parts,
            loaded_state,
            groups=lambda key: group_of(key, entries),
            metric_logger=getattr(trainer, "metrics_processor", None),
            pipelined=len(parts) > 1 or getattr(getattr(trainer, "parallel_dims", None), "pp_enabled", False),
            record=record,
        )

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: Any,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Any:
        step = step_of(checkpoint_id)
        if not self.guard_config.validate_initial_load or to_hf or step is None or "://" in str(checkpoint_id):
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        self._finish_record()
        saved = as_state_dicts(state_dict)  # the host saves exactly the objects recorded
        record = record_save(saved, step=step, checkpoint=str(checkpoint_id))  # summed while DCP saves
        result = super().dcp_save(saved, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        record.write_when_saved(result)  # a synchronous save: the sums joined and the record written now
        self._pending_record = record if record.waits else None
        return result

    def _maybe_wait_for_staging(self) -> None:
        super()._maybe_wait_for_staging()
        self._finish_record()  # the host calls it before the optimizer step: the sums must end before it

    def _wait_for_saving(self) -> None:
        super()._wait_for_saving()
        pending, self._pending_record = self._pending_record, None
        if pending is not None:
            pending.flush()  # the future's callback may not have run yet when its waiters wake

    def _close(self) -> None:
        self._finish_record()  # written by the save's callback if it completes later
        super()._close()

    def _finish_record(self) -> None:
        """Join the pending record's sums (every rank: a collective); it is written once its save completes."""
        pending = getattr(self, "_pending_record", None)
        if pending is not None:
            pending.finish()

    def _loaded_state(self, fingerprints: Any = None) -> dict[str, Any]:
        """The loaded parameters in the key space of the recorded fingerprints: the model's own keys, or for an HF
        load the HF keys the adapter maps them to (the same ``to_hf`` the host loaded through, on the live
        tensors). An HF load checked against a native conversion's manifest (``--layout torchtitan:<module>``,
        fingerprints under the model's own keys) is verified in the model's keys: both hold the same values."""
        state = model_state(self.states[MODEL])
        if not self._from_hf or _recorded_natively(fingerprints, state):
            return state
        return self.sd_adapter.to_hf(state)

    def _is_resume(self, checkpoint_id: str) -> bool:
        step = step_of(checkpoint_id)
        return bool(step) and checkpoint_id == self._create_checkpoint_id(step)

    def _check_before(
        self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> InitialLoadGuard:
        parts = self.states[MODEL].model
        trainer = self.states.get("train_state")
        if len(parts) > 1 or getattr(getattr(trainer, "parallel_dims", None), "pp_enabled", False):
            raise GuardConfigError(
                "checkpoint.validate_initial_load does not support pipeline parallel (the reference forward pass "
                "would need the pipeline schedule); validate the checkpoint with `flame-ext diagnose --loss` and "
                "set checkpoint.validate_initial_load = false"
            )
        if "://" in str(checkpoint_id):
            raise GuardConfigError(
                "checkpoint.validate_initial_load reads the checkpoint's metadata and flame_ext.json from a local "
                "folder; "
                f"{checkpoint_id} is remote: copy it locally, or check it with `flame-ext diagnose` and switch the "
                "guard off"
            )
        guard = InitialLoadGuard(self.guard_config, str(checkpoint_id), parts)
        requested = split_request(state_dict)
        if not from_hf:
            guard.before_load(
                requested, lambda: read_dcp_metadata(checkpoint_id), tied=tied_keys(parts, requested.model_prefix)
            )
            return guard
        assert self.sd_adapter is not None, "initial_load_in_hf needs the model's state-dict adapter"
        hf_request, unmapped = self._hf_request(state_dict)
        reader = self.sd_adapter.get_hf_storage_reader(checkpoint_id, from_quantized)
        guard.before_load(hf_request, lambda: _reader_specs(reader), extra=unmapped)
        return guard

    def _hf_request(self, state_dict: dict[str, Any]) -> tuple[RequestedLoad, list[Problem]]:
        """The HF keys the host will ask the safetensors for, and model keys its adapter maps to none."""
        adapter = self.sd_adapter
        hf_meta = adapter.to_hf(meta_copy({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}))
        requested = RequestedLoad({k: TensorSpec(tuple(v.shape), dtype_name(v.dtype)) for k, v in hf_meta.items()}, [])
        try:
            back = set(adapter.from_hf(dict(hf_meta)))
        except Exception as exc:  # an adapter that computes on values cannot run on meta: skip this check
            logger.debug("flame-ext: cannot round-trip the state-dict adapter on meta tensors: %s", exc)
            return requested, []
        unmapped = [
            Problem(
                "missing_key",
                "error",
                k,
                f"the model asks for it, but {type(adapter).__name__} maps no HF key to it",
                "it would keep its initial (random) value: extend the adapter's from_hf_map, or check the model flavor "
                "matches the HF config",
            )
            for k in sorted(state_dict)
            if isinstance(state_dict[k], torch.Tensor) and k not in back
        ]
        return requested, unmapped

    def _loss_probe(self, parts: list[torch.nn.Module]) -> tuple[LossProbe, int, int | None]:
        """The host's own loss when the Trainer is reachable (native torchtitan models), else HF-style logits;
        with the chunk multiple the loss needs and the longest sequence the model was built for."""
        trainer = self.states.get("train_state")
        if all(hasattr(trainer, a) for a in ("loss_fn", "post_dataloading_process", "train_context")):
            training = getattr(getattr(trainer, "config", None), "training", None)
            longest = getattr(training, "max_context_length" if FOLDS_BATCH else "seq_len", None)
            return _trainer_probe(trainer, parts[0]), int(getattr(trainer.loss_fn, "num_chunks", 1) or 1), longest
        if isinstance(parts[0], BaseModel):  # a native model outside the Trainer: the masks its Trainer builds
            return hf_loss_probe(NativeRows(parts[0])), 1, None
        return hf_loss_probe(parts[0]), 1, None


def _recorded_natively(fingerprints: Any, state: dict[str, Any]) -> bool:
    """True when the recorded fingerprints are keyed as the model's own state dict (a native conversion)."""
    recorded = fingerprints if isinstance(fingerprints, dict) else {}
    return bool(recorded) and sum(k in recorded for k in state) * 2 > len(state)


def _reader_specs(reader: Any) -> dict[str, TensorSpec | None]:
    """Key -> global shape/dtype from a DCP storage reader's metadata (safetensors headers for HF)."""
    metadata = reader.read_metadata().state_dict_metadata
    return {
        k: TensorSpec(tuple(m.size), dtype_name(m.properties.dtype)) if isinstance(m, TensorStorageMetadata) else None
        for k, m in metadata.items()
    }


def _local(t: Any) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: this rank's part; ranks' parts are summed by the guard
    return to_local() if callable(to_local) else t


def _trainer_probe(trainer: Any, model: torch.nn.Module) -> LossProbe:
    """Forward and loss exactly as ``Trainer.forward_backward_step`` does, minus backward.

    Positions are given as the dataloader gives them for one document per row. ``post_dataloading_process``
    counts tokens into ``trainer.ntokens_seen``; that count is put back. Each position range is scored by
    the host's loss on labels outside the range set to the ignore index, so chunked and loss-parallel
    losses need no per-token output. A range of one row (the gate's per-token ranges, one per token) is
    scored from the cross entropy of each token's logits instead, which is how the HF reference scores
    it: the host's loss once per token would cost a whole loss (a chunked loss: the lm_head too) per token.
    """

    def probe(token_ids: torch.Tensor, ranges: list[Range]) -> torch.Tensor:
        device = getattr(trainer, "device", torch.device("cpu"))
        inputs, labels = token_ids[:, :-1].to(device), token_ids[:, 1:].to(device)
        positions = torch.arange(inputs.shape[1], device=device).expand_as(inputs).contiguous()
        layout = _fold if FOLDS_BATCH else (lambda t: t)
        batch = {"input": layout(inputs), "positions": layout(positions)}
        seen = trainer.ntokens_seen
        rows = []
        try:
            x, y_all, extra = trainer.post_dataloading_process(batch, layout(labels))
            # Where each label went (context parallel shards and reorders them): the same processing on indexes.
            _, where, _ = trainer.post_dataloading_process(batch, layout(_indexes(labels)))
            with trainer.train_context():
                pred = model(x, **extra)
                per_token = _token_losses(trainer, pred, y_all, where, labels.shape)
                for rng in ranges:
                    if per_token is not None and len(rng) > 2:
                        cells = per_token[rows_of(rng), rng[0] : rng[1]]
                        scored = ~torch.isnan(cells)  # tokens this rank does not hold count 0
                        rows.append([cells[scored].sum().item(), float(scored.sum().item())])
                        continue
                    y, loss_kwargs = _masked_labels(trainer, batch, labels, layout, rng)
                    loss_sum, _ = trainer.loss_fn(pred, y, **loss_kwargs)
                    count = (_local(y) != IGNORE_INDEX).sum()
                    rows.append([_local(loss_sum).double().item(), float(count.item())])
        finally:
            trainer.ntokens_seen = seen
        return torch.tensor(rows, dtype=torch.float64)

    return probe


def _indexes(labels: torch.Tensor) -> torch.Tensor:
    return torch.arange(labels.numel(), device=labels.device).view_as(labels)


def _token_losses(trainer: Any, pred: Any, y_all: Any, where: Any, shape: torch.Size) -> torch.Tensor | None:
    """Each token's cross entropy in the ``[B, n]`` layout of the labels, float64 on the CPU (NaN where this
    rank holds no such token); None when the logits or the label layout cannot be had as plain tensors (the
    host's loss then scores every range)."""
    lm_head = getattr(trainer.loss_fn, "lm_head", None)  # a chunked loss takes hidden states and applies it
    logits = lm_head(pred) if isinstance(lm_head, torch.nn.Module) else pred
    full = getattr(logits, "full_tensor", None)  # loss parallel: the vocabulary shards gathered
    logits = full() if callable(full) else logits
    if not all(isinstance(t, torch.Tensor) and not callable(getattr(t, "to_local", None)) for t in (y_all, where)):
        return None
    if not isinstance(logits, torch.Tensor) or logits.shape[:-1].numel() != y_all.numel():
        return None
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), y_all.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    out = torch.full((shape.numel(),), float("nan"), dtype=torch.float64)
    out[where.reshape(-1).cpu()] = losses.double().cpu()
    return out.view(shape)


def _masked_labels(
    trainer: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor, layout: Any, rng: Range
) -> tuple[Any, dict[str, Any]]:
    """The range's labels as ``post_dataloading_process`` hands them to the loss, every other label set to
    the ignore index; with the loss's keyword arguments."""
    cell = (rows_of(rng), slice(rng[0], rng[1]))
    only = torch.full_like(labels, IGNORE_INDEX)
    only[cell] = labels[cell]
    _, y, extra = trainer.post_dataloading_process(batch, layout(only))
    return y, ({"positions": extra["positions"]} if "positions" in extra else {})


def _fold(rows: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` -> ``[T]``: the rows packed one after another, as a batch-folding host's dataloader gives them."""
    return rows.reshape(-1)


class NativeRows(nn.Module):
    """A native torchtitan model seen as one taking ``[B, L]`` token rows and returning ``[B, L, V]``, each row
    its own document, with the attention masks the host's ``post_dataloading_process`` would build for it.

    0.3.0's models take the rows as they are, plus the document masks a Flex or varlen model needs (SDPA takes
    none). A batch-folding host's models take the rows packed (``[T]``, positions restarting at each row).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows, length = token_ids.shape
        positions = torch.arange(length, device=token_ids.device).expand(rows, length)
        if not FOLDS_BATCH:
            return self.model(token_ids, **_attention_masks(self.model, positions.contiguous()))
        packed = _fold(positions)
        logits = self.model(_fold(token_ids), positions=packed, **_attention_masks(self.model, packed))
        return logits.reshape(rows, length, -1)


def _attention_masks(model: nn.Module, positions: torch.Tensor) -> dict[str, Any]:
    """The document masks the host builds from ``positions``; none for a backend that takes none (the host's
    ``get_attention_masks`` refuses those with a TypeError)."""
    build = getattr(model, "get_attention_masks", None)
    if not callable(build):
        return {}
    try:
        return {"attention_masks": build(positions=positions)}
    except TypeError:
        return {}
