"""The step-0 forward pass: a host's loss probe, run in eval mode on every rank alike.

A probe maps ``token_ids [B, n+1]`` and position ranges ``[start, end)`` of the n predicted positions to
float64 ``[len(ranges), 2]``: (sum of per-token loss, token count) per range. Sums and counts, not means,
so the ranks add them up. A range ``(start, end)`` covers every row; ``(start, end, row)`` that row only
(the loss gate asks for every token on its own: ``step0_loss.measure_loss``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flame_ext.errors import GuardConfigError
from flame_ext.guard.ranks import RankFailure, max_over_ranks

__all__ = ["LossProbe", "Range", "rows_of", "IGNORE_INDEX", "hf_loss_probe", "run_probe"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by

IGNORE_INDEX = -100  # the label value torch's cross entropy (and torchtitan's loss) skips

# (start, end) of the predicted positions, in every row; (start, end, row) in that row only.
Range = tuple[int, ...]
LossProbe = Callable[[torch.Tensor, list[Range]], torch.Tensor]


def rows_of(rng: Range) -> slice:
    """The rows a range covers: all, or the one it names."""
    return slice(rng[2], rng[2] + 1) if len(rng) > 2 else slice(None)


def _logits_of(output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise GuardConfigError(
            "the model's forward returned no logits; the step-0 loss check needs them (for a model with a fused "
            "loss, compute logits when no labels are given)"
        )
    full = getattr(logits, "full_tensor", None)  # a DTensor (loss parallel): gather the vocab shards
    return full() if callable(full) else logits


def hf_loss_probe(model: nn.Module) -> LossProbe:
    """Loss the way HF causal LMs compute it with ``labels=``: logits, shift by one, cross entropy."""
    from flame_ext.model.reference_loss import per_token_loss

    def probe(token_ids: torch.Tensor, ranges: list[Range]) -> torch.Tensor:
        device = next(model.parameters()).device
        per_token = per_token_loss(_logits_of(model(token_ids.to(device))), token_ids).double().cpu()
        cells = [per_token[rows_of(r), r[0] : r[1]] for r in ranges]
        return torch.tensor([[c.sum().item(), c.numel()] for c in cells], dtype=torch.float64)

    return probe


class _EvalMode:
    """Eval mode and no_grad for the probe, then each module's own training flag back (not ``train()``)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = parts

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for part in self.parts for m in part.modules()]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        for part in self.parts:
            part.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, flag in self.flags:
            module.training = flag
        self.no_grad.__exit__(*exc)


def run_probe(
    probe: LossProbe, parts: list[nn.Module], ids: torch.Tensor, ranges: list[Range]
) -> tuple[torch.Tensor | None, str | None]:
    """(the probe's sums, None), or (None, why) on every rank when any rank's device cannot run the model's
    forward pass. Only that one failure (``model.reference_loss.forward_unavailable``) skips; any other is raised.
    """
    from flame_ext.model.reference_loss import forward_unavailable

    reason, failure = None, None
    try:
        with _EvalMode(parts):
            sums = probe(ids, ranges).to(torch.float64).cpu()
    except Exception as exc:
        reason = forward_unavailable(exc)
        failure = exc if reason is None else None
    # One collective, so that every rank takes the same branch: fail, skip, or go on to the comparison.
    state = max_over_ranks(2.0 if failure is not None else 1.0 if reason is not None else 0.0)
    if failure is not None:
        raise failure
    if state == 2.0:
        raise RankFailure("the step-0 forward pass failed on another rank")
    if state == 1.0:
        skipped = reason or "another rank cannot run the model's forward pass"
        logger.warning(
            "flame-ext: step-0 loss gate skipped: the model's forward pass cannot run here (%s); every other "
            "check ran. Run the first steps on a machine that can run it to have the loss checked",
            skipped,
        )
        return None, skipped
    return sums, None
