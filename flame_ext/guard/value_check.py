"""After loading: every loaded tensor against the fingerprint recorded when it was written
(``fingerprints.compare``). Each rank sums its shards of the values as they are, one all-reduce gives the
whole; exact, no threshold. The coverage (how many loaded tensors had a fingerprint to check) is always
stated, and anything short of all of them is a warning, or an error when verification was asked for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from flame_ext.guard.ranks import sum_over_ranks, world
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

if TYPE_CHECKING:
    from flame_ext.fingerprints.record import Fingerprints

__all__ = ["ValueCheck", "verify_loaded_values"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by

# ``InitialLoadGuard._agreed``: runs a step on every rank and ends all of them if it failed on one.
Agreed = Callable[[Callable[[], Any], str], Any]


class ValueCheck:
    """What the value check found: its problems, its figures for the metric logger, its line for the report
    and the label the final log line gives it (``values``, or ``values: N of M`` when some were not verified)."""

    def __init__(self, problems: list[Problem], verified: int, total: int, mismatched: int) -> None:
        self.problems = problems
        self.figures = {
            "initial_load/tensors_verified": verified,
            "initial_load/tensors_total": total,
            "initial_load/value_mismatches": mismatched,
        }
        self.complete = verified == total
        self.label = "values" if self.complete else f"values: {verified} of {total}"
        self.note = (
            f"values: {verified} of {total} tensors verified against the fingerprints recorded at conversion, "
            f"{mismatched} differ"
        )


def verify_loaded_values(
    fingerprints: Fingerprints,
    loaded: Mapping[str, Any],
    found: Mapping[str, TensorSpec | None],
    agreed: Agreed,
    *,
    required: bool = False,
) -> ValueCheck:
    """Every rank's share of each fingerprint, one all-reduce, then the same comparison on every rank.

    The values are summed as the trainer holds them; the recorded fingerprint they must match is chosen by
    the dtype of those values (``fingerprints.compare.expected_fingerprint``). ``required``
    (``initial_load_verify_values = true``): a loaded tensor with no fingerprint to check is an error.

    ALL ranks must call it: it holds collectives.
    """
    from flame_ext.fingerprints.algorithm import TERMS, local_fingerprint
    from flame_ext.fingerprints.compare import (
        coverage_problems,
        differing_keys,
        fingerprint_problems,
        plan_verification,
        values_dtype,
    )

    start = time.perf_counter()
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    dtypes = {k: values_dtype(_name(v.dtype), getattr(found.get(k), "dtype", None)) for k, v in tensors.items()}
    plan = plan_verification(fingerprints, tensors, dtypes)
    keys = list(plan.keys)

    def shares() -> torch.Tensor:
        parts = [local_fingerprint(tensors[k]) for k in keys]
        return torch.stack(parts) if parts else torch.zeros(0, len(TERMS), dtype=torch.float64)

    total = sum_over_ranks(agreed(shares, "the value check"))
    observed = dict(zip(keys, total))
    shapes = {k: tuple(tensors[k].shape) for k in keys}
    problems = agreed(
        lambda: fingerprint_problems(observed, fingerprints, plan, shapes) + coverage_problems(plan, required=required),
        "the value check",
    )
    check = ValueCheck(problems, len(keys), plan.total, len(differing_keys(observed, fingerprints, plan)))
    logger.info(
        "flame-ext: verified the values of %d loaded tensors (of %d) against their recorded fingerprints on %d "
        "rank(s): %d differ (%.0f ms)",
        len(keys),
        plan.total,
        world(),
        check.figures["initial_load/value_mismatches"],
        (time.perf_counter() - start) * 1e3,
    )
    for p in problems:
        if p.kind == "manifest" and p.severity == "warning":  # an error is in the failure report
            logger.warning("flame-ext: %s", p.detail)
    return check


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
