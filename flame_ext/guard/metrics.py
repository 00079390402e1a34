"""The step-0 figures, handed to the host's metric logger beside the training loss."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flame_ext.report import LossComparison

__all__ = ["record_metrics", "record_figures"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by


def record_metrics(metric_logger: Any, lo: LossComparison, extra: Mapping[str, float] | None = None) -> None:
    """Step-0 figures to the host's metric logger (torchtitan MetricsProcessor or its logger), if any:
    the loss comparison and ``extra`` (tensors verified, value mismatches)."""
    target = getattr(metric_logger, "logger", metric_logger)
    if target is None or not callable(getattr(target, "log", None)):
        return
    figures = {
        "initial_load/loss": lo.observed,
        "initial_load/reference_loss": lo.reference,
        "initial_load/loss_delta": lo.delta,
    }
    if lo.token_delta is not None:  # mean |per-token difference|: what the mean's cancelling errors hide
        figures["initial_load/token_delta"] = lo.token_delta
    figures.update({f"initial_load/loss_pos_{b['start']}_{b['end']}": b["observed"] for b in lo.by_position})
    figures.update(extra or {})
    try:
        target.log(figures, 0)
    except Exception as exc:  # a metrics backend failing must not stop training over a log line
        logger.warning("flame-ext: could not record the step-0 figures with %s: %s", type(target).__name__, exc)


def record_figures(metric_logger: Any, figures: Mapping[str, float], step: int) -> None:
    """Figures of a later load (a resume's ``resume/...``) to the host's metric logger at ``step``, if any."""
    target = getattr(metric_logger, "logger", metric_logger)
    if target is None or not callable(getattr(target, "log", None)) or not figures:
        return
    try:
        target.log(dict(figures), step)
    except Exception as exc:  # a metrics backend failing must not stop training over a log line
        logger.warning(
            "flame-ext: could not record the figures of step %d with %s: %s", step, type(target).__name__, exc
        )
