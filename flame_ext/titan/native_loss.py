"""``diagnose --loss`` on a torchtitan-native checkpoint: torchtitan's own model class, run on the CPU on the
reference batch, against the HF reference loss.

The HF reference is the HF model's loss on these weights. The observed loss is torchtitan's implementation
(its attention, its RoPE, its adapter's q/k layout) on the same weights in torchtitan's key space. Equal
losses say both that the checkpoint holds the HF weights and that the two implementations agree on them;
a gap with equal values (``--values`` clean) points at the implementation or the model config.

The model is built as the Trainer builds it: on ``meta``, ``to_empty``, ``init_weights`` (which computes the
non-persistent buffers, the RoPE cache among them, from the config), then every model tensor is loaded from
the checkpoint with ``torch.distributed.checkpoint``. The rows are handed over as the guard hands them to a
native model (``v03.NativeRows``): packed on a batch-folding torchtitan (main), with the document masks its
Trainer would build for a Flex or varlen model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flame_ext.checks.loss import (
    LossResult,
    compare_loss,
    load_into,
    loss_gap_problem,
    not_loaded_note,
    reference_fit_problem,
)
from flame_ext.io.specs import TensorSpec

__all__ = ["build_native_like_trainer", "native_forward", "check_native_loss"]


def build_native_like_trainer(model_config: Any) -> torch.nn.Module:
    """The torchtitan model as its Trainer builds it, on the CPU: every parameter is overwritten by the load,
    the buffers keep what ``init_weights`` computed from the config."""
    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.eval()


def native_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, L]`` token ids -> ``[B, L, V]`` logits, whichever batch layout the installed torchtitan uses."""
    from flame_ext.titan.v03 import NativeRows

    rows = NativeRows(model)

    def forward(token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return rows(token_ids)

    return forward


def check_native_loss(
    model_config: Any,
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    key_map: dict[str, str],
    reference: dict[str, Any],
    origin: str,
    *,
    module: str,
    threshold: float,
    token_threshold: float,
    value_problems: bool = False,
) -> LossResult:
    """torchtitan's model on the checkpoint against ``reference`` (the HF reference record, from ``origin``)."""
    from flame_ext.model.reference_loss import per_token_loss

    result = LossResult(None)
    model = build_native_like_trainer(model_config)
    foreign = reference_fit_problem(
        reference["token_ids"], [model], origin, "the reference was made for another model; pass --reference"
    )
    if foreign:
        result.problems.append(foreign)
        result.notes.append("loss not measured: the reference batch is not for this model")
        return result
    not_loaded = load_into(model, folder, found, key_map, through_hooks=True)
    if not_loaded:
        result.notes.append(not_loaded_note(not_loaded))
        return result
    token_ids = torch.tensor(reference["token_ids"], dtype=torch.long)
    observed = per_token_loss(native_forward(model)(token_ids), token_ids)
    cmp = compare_loss(observed, reference, threshold, token_threshold)
    result.comparison = cmp
    result.notes.append(
        f"loss of torchtitan's own {module} model ({type(model).__name__}, CPU) compared with {origin} on "
        f"{tuple(token_ids.shape)} tokens"
    )
    if not cmp.ok:
        next_step = (
            "the values differ too: re-convert from the HF source with `flame-ext convert --layout "
            f"torchtitan:{module}`"
            if value_problems
            else "if --values finds every tensor equal, torchtitan's implementation or its model config computes "
            "something else than the HF model on these weights (compare the configs: rope, norm eps, heads)"
        )
        result.problems.append(
            loss_gap_problem(
                cmp, what=f"torchtitan {module} loss on the reference batch", next_step=next_step,
                values_differ=value_problems,
            )
        )  # fmt: skip
    return result
