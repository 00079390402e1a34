"""After loading: every loaded tensor against the fingerprint recorded when it was written
(``checks.fingerprints``). Each rank sums its shards, one all-reduce gives the whole; exact, no threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flame_ext.guard.ranks import sum_over_ranks, world
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

__all__ = ["ValueCheck", "verify_loaded_values"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by

# ``InitialLoadGuard._agreed``: runs a step on every rank and ends all of them if it failed on one.
Agreed = Callable[[Callable[[], Any], str], Any]


class ValueCheck:
    """What the value check found: its problems, its figures for the metric logger, its line for the report."""

    def __init__(self, problems: list[Problem], verified: int, unrecorded: int) -> None:
        self.problems = problems
        mismatched = sum(1 for p in problems if p.severity == "error")
        self.figures = {"initial_load/tensors_verified": verified, "initial_load/value_mismatches": mismatched}
        self.note = f"values: {verified} tensors verified against the fingerprints recorded at conversion, " + (
            f"{mismatched} differ" + (f"; {unrecorded} loaded tensors have none" if unrecorded else "")
        )


def verify_loaded_values(
    fingerprints: Any, loaded: Mapping[str, Any], found: Mapping[str, TensorSpec | None], agreed: Agreed
) -> ValueCheck:
    """Every rank's share of each fingerprint, one all-reduce, then the same comparison on every rank.

    ALL ranks must call it: it holds collectives.
    """
    from flame_ext.checks.fingerprints import fingerprint_problems, plan_verification
    from flame_ext.io.fingerprint import TERMS, local_fingerprint

    start = time.perf_counter()
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    plan = plan_verification(fingerprints, tensors)
    keys = list(plan.keys)

    def shares() -> torch.Tensor:
        dtypes = [getattr(torch, fingerprints[plan.keys[k]][0]) for k in keys]
        parts = [local_fingerprint(tensors[k], d) for k, d in zip(keys, dtypes)]
        return torch.stack(parts) if parts else torch.zeros(0, len(TERMS), dtype=torch.float64)

    total = sum_over_ranks(agreed(shares, "the value check"))
    observed = dict(zip(keys, total))
    stored = {k: s.dtype for k, s in found.items() if s is not None}
    shapes = {k: tuple(tensors[k].shape) for k in keys}
    problems = agreed(
        lambda: fingerprint_problems(observed, fingerprints, plan, shapes, stored_dtypes=stored), "the value check"
    )
    check = ValueCheck(problems, len(keys), len(plan.unrecorded))
    logger.info(
        "flame-ext: verified the values of %d loaded tensors against their recorded fingerprints on %d rank(s): "
        "%d differ (%.0f ms)",
        len(keys),
        world(),
        check.figures["initial_load/value_mismatches"],
        (time.perf_counter() - start) * 1e3,
    )
    return check
