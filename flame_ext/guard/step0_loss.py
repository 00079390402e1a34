"""The step-0 loss gate: one forward pass on the manifest's reference batch, against the HF model's loss on
the same tokens, measured by position bucket and token by token, pooled over ranks, and judged against the
thresholds of the mean gap and of the per-token gap (``flame_ext.checks.loss.token_delta``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from flame_ext.errors import FlameExtError, GuardConfigError
from flame_ext.guard.probe import Range
from flame_ext.guard.ranks import max_over_ranks, rank, sum_over_ranks
from flame_ext.report import LossComparison, Problem, bucket_label

__all__ = [
    "RankGaps",
    "measure_loss",
    "loss_gate_problems",
    "missing_reference_problems",
    "log_loss",
    "draw_loss_plot",
]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by

NEXT_STEP = "run `flame-ext diagnose --checkpoint C --model HF --values --loss` to find the tensors that differ"

# The guard's probe on every rank: the sums of ``probe.LossProbe``, or None on every rank when it was skipped.
RunProbe = Callable[[torch.Tensor, list[Range]], "torch.Tensor | None"]


@dataclass(frozen=True)
class RankGaps:
    """The worst single rank's gaps: its mean loss's |delta| and its per-token delta (over the tokens it
    scored). One rank with wrong weights among 256 would move the pooled figures by only 1/256 of its gap."""

    mean: float = 0.0
    tokens: float = 0.0


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def measure_loss(
    reference: dict[str, Any],
    run: RunProbe,
    *,
    multiple: int,
    max_positions: int | None,
    threshold: float,
    token_threshold: float,
    per_position: bool,
) -> tuple[LossComparison | None, RankGaps]:
    """(the step-0 comparison over all ranks, the worst single rank's gaps); (None, RankGaps()) when skipped.

    The reference rows are cut to ``max_positions`` predicted positions and to a multiple of ``multiple``:
    the model is causal, so a prefix's per-token reference is exact. The one forward pass scores the whole
    batch, the first position, the position buckets and every token on its own (a range per token: the
    per-token sums are what the ranks can add up). ``per_position`` keeps every position's loss, for the plot.
    """
    from flame_ext.checks.loss import loss_by_position, token_delta

    ids = torch.tensor(reference["token_ids"], dtype=torch.long)
    ref = torch.tensor(reference["loss_per_token"], dtype=torch.float64)
    n = min(ids.shape[1] - 1, max_positions or ids.shape[1])
    n = (n // multiple) * multiple  # predicted positions the host's model and loss can take
    if n < 1:
        raise GuardConfigError(
            f"reference rows of {ids.shape[1]} tokens are too short for a loss in chunks of {multiple}"
        )
    ref = ref[:, :n]
    rows = ref.shape[0]
    buckets = loss_by_position(ref, ref)
    ranges: list[Range] = [(0, n), (0, 1)] + [(b["start"], b["end"]) for b in buckets]  # all, first, buckets
    tokens: list[Range] = [(i, i + 1, r) for r in range(rows) for i in range(n)]
    sums = run(ids[:, : n + 1], ranges + tokens)
    if sums is None:
        return None, RankGaps()
    head = len(ranges)
    reference_mean = float(reference["loss_mean"]) if n == ids.shape[1] - 1 else ref.mean().item()
    # The pooled figures are what is logged; the gate also looks at the worst single rank (``RankGaps``).
    own_tokens = (sums[head:, 0] / sums[head:, 1]).view(rows, n)
    scored = sums[head:, 1].view(rows, n) > 0  # a rank may hold part of the sequence (context parallel)
    worst = RankGaps(
        max_over_ranks(_finite_or_inf(abs((sums[0, 0] / sums[0, 1]).item() - reference_mean))),
        max_over_ranks(_finite_or_inf(token_delta(own_tokens[scored], ref[scored]) if scored.any() else math.nan)),
    )
    sums = sum_over_ranks(sums)
    means = (sums[:, 0] / sums[:, 1]).tolist()
    by_position = [{**b, "observed": m} for b, m in zip(buckets, means[2:head])]
    first = means[1] - ref[:, 0].mean().item()
    pooled = (sums[head:, 0] / sums[head:, 1]).view(rows, n)
    cmp = LossComparison(
        reference_mean,
        means[0],
        threshold,
        by_position,
        first,
        token_delta=token_delta(pooled, ref),
        token_threshold=token_threshold,
    )
    if per_position:
        per_column = sums[head:].view(rows, n, 2).sum(0)
        cmp.curve = {"observed": (per_column[:, 0] / per_column[:, 1]).tolist(), "reference": ref.mean(0).tolist()}
    return cmp, worst


def missing_reference_problems(run: RunProbe, multiple: int, unavailable: str | None) -> list[Problem]:
    """No reference loss (convert could not run the model): fine if this machine cannot run it either (the
    probe skips), an error if it can."""
    ids = torch.zeros((1, max(multiple, 1) + 1), dtype=torch.long)  # token 0 exists in every vocabulary
    if run(ids, [(0, ids.shape[1] - 1)]) is None:
        return []
    return [
        Problem(
            "manifest",
            "error",
            None,
            f"no reference loss for the step-0 check: the conversion could not run the model ({unavailable}), "
            "and this machine can",
            "on this machine run `flame-ext reference --model HF --out REF.json` and set "
            "checkpoint.initial_load_reference = REF.json, or set checkpoint.validate_initial_load = false",
        )
    ]


def loss_gate_problems(
    comparison: LossComparison, worst_rank: RankGaps, *, values_differ: bool, wrong_buffers: Sequence[str] = ()
) -> list[Problem]:
    """The gate: a non-finite loss, a mean or per-token gap above its threshold, over all ranks or on one
    rank alone, is an error.

    ``wrong_buffers``: the non-persistent buffers found wrong after the load (``buffer_mismatch`` errors). They
    are the cause of a non-finite loss then, and the hint names them: ``diagnose --values`` reads the
    checkpoint, which holds no buffer, and would find nothing.
    """
    buffer_cause = _buffer_cause(wrong_buffers)
    if not math.isfinite(comparison.observed):
        hint = buffer_cause or "a weight holds inf/NaN after loading: run `flame-ext diagnose --checkpoint C --values`"
        return [Problem("nonfinite", "error", None, f"step-0 loss is {comparison.observed}", hint)]
    if not comparison.ok:
        from flame_ext.checks.loss import loss_gap_problem, positional_hint

        gap = loss_gap_problem(comparison, what="step-0 loss", next_step=NEXT_STEP, values_differ=values_differ)
        if not buffer_cause:
            return [gap]
        clue = positional_hint(comparison)  # what the gap's shape says, kept: it agrees with a RoPE buffer
        return [replace(gap, hint=buffer_cause + (f" (the gap's shape agrees: {clue})" if clue else ""))]
    token_threshold = comparison.token_threshold if comparison.token_threshold is not None else math.inf
    if worst_rank.mean > comparison.threshold or worst_rank.tokens > token_threshold:
        return [
            Problem(
                "loss_gap",
                "error",
                None,
                "the step-0 loss over all ranks passes, but one rank's differs from the HF reference: mean gap "
                f"{worst_rank.mean:.4f} (threshold {comparison.threshold}), mean |per-token loss difference| "
                f"{worst_rank.tokens:.4f} (threshold {comparison.token_threshold})",
                "ranks loaded different weights: check that every rank reads the same checkpoint; run `flame-ext "
                "diagnose --checkpoint C --model HF --values --loss` on it",
            )
        ]
    return []


def _buffer_cause(wrong_buffers: Sequence[str]) -> str | None:
    """The hint of a loss problem that wrong buffers explain: their fix, not a value check that reads the
    checkpoint (which holds no buffer) and finds nothing."""
    if not wrong_buffers:
        return None
    named = wrong_buffers[0] + (f" and {len(wrong_buffers) - 1} more" if len(wrong_buffers) > 1 else "")
    return (
        f"caused by the buffer_mismatch above ({named}: what to_empty() left, which no checkpoint restores), not "
        "by the checkpoint's tensors: set checkpoint.initial_load_repair_buffers = true"
    )


def log_loss(lo: LossComparison) -> None:
    logger.info(
        "step-0 loss %.4f vs HF reference %.4f (delta %+.4f, threshold %g); per token: mean |difference| %.4f "
        "(threshold %g)",
        lo.observed,
        lo.reference,
        lo.delta,
        lo.threshold,
        lo.token_delta if lo.token_delta is not None else math.nan,
        lo.token_threshold if lo.token_threshold is not None else math.nan,
    )
    logger.info(
        "step-0 loss by position: %s",
        "  ".join(f"{bucket_label(b)}: {b['observed']:.4f} (ref {b['reference']:.4f})" for b in lo.by_position),
    )


def draw_loss_plot(cmp: LossComparison, path: str | None, checkpoint: str) -> str | None:
    """Rank 0 draws ``initial_load_plot``; returns the report's note, or None. A plot that cannot be written
    is a warning, never a stop."""
    if not path or rank() != 0 or cmp.curve is None:
        return None
    from flame_ext.io.plot import plot_loss

    try:
        plot_loss(cmp, path, title=f"step-0 loss of {checkpoint} against the HF reference")
    except (FlameExtError, OSError) as exc:
        logger.warning("flame-ext: could not write checkpoint.initial_load_plot %s: %s", path, exc)
        return None
    logger.info("flame-ext: per-position step-0 loss drawn in %s", path)
    return f"per-position step-0 loss drawn in {path}"
