"""Fingerprint forensics: what most likely happened to a tensor whose fingerprint does not match the one
recorded when it was written (zeros, another key's values, the transpose, rows or columns moved, a scale,
rounding, noise), told from the two fingerprints alone (``fingerprints.algorithm`` defines the sums).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# The per-term scales and the linear terms are the algorithm's own definitions, shared rather than restated.
from flame_ext.fingerprints.algorithm import _LINEAR, TERMS, TOLERANCE, _as_tensor, _scales, matches, transposed

__all__ = ["Finding", "what_happened"]


@dataclass(frozen=True)
class Finding:
    """What most likely happened to a tensor whose fingerprint does not match: a short code and a sentence."""

    code: str  # nonfinite, zeros, swapped, transposed, scaled, rows_permuted, columns_permuted,
    # rearranged, rounding, noise, different
    text: str
    other: str | None = None  # swapped: the one key whose expected values this tensor holds


def what_happened(
    key: str,
    observed: torch.Tensor | Sequence[float],
    expected: torch.Tensor | Sequence[float],
    *,
    shape: Sequence[int],
    dtype: str,
    others: Mapping[str, torch.Tensor | Sequence[float]] | None = None,
    tol: float = TOLERANCE,
) -> Finding:
    """The most likely story behind a mismatch, told from the two fingerprints (and the other keys' ones).

    Exact stories (zeros, another key's values, the transpose, the same values elsewhere) are checked first;
    scale and noise are estimates from the sums, and say so.
    """
    o, e = _as_tensor(observed), _as_tensor(expected)
    if o[0] != e[0]:
        return Finding("nonfinite", f"{int(o[0])} values are NaN or inf (expected: {int(e[0])})")
    if o[2] == 0 and e[2] != 0:
        return Finding("zeros", "it holds only zeros")
    twins = sorted(k for k, fp in (others or {}).items() if k != key and matches(o, fp, tol))
    if twins:
        more = f" (or one of {len(twins) - 1} other identical tensors)" if len(twins) > 1 else ""
        return Finding(
            "swapped",
            f"it holds the values expected for {twins[0]}{more}: keys swapped or mixed up",
            other=twins[0] if len(twins) == 1 else None,
        )
    square = len(shape) == 2 and shape[0] == shape[1]
    if square and matches(o, transposed(e), tol):
        return Finding("transposed", "it holds the expected values transposed")
    if all(_close(o, e, i, tol) for i in range(1, 4)):  # the same values, other places
        return _arrangement(o, e, tol)
    eps = torch.finfo(getattr(torch, dtype)).eps if getattr(torch, dtype).is_floating_point else 0.0
    scaled = _scale_factor(o, e, eps)
    if scaled is not None:
        return Finding("scaled", f"it holds the expected values scaled by {scaled:.4g}")
    rel = _noise_estimate(o, e, shape)
    if rel <= 2 * eps:
        return Finding(
            "rounding",
            f"the values differ at the level of {dtype} rounding (relative size ~{rel:.1g}, estimated from the "
            "weighted sums): rounded through another dtype, or a different cast",
        )
    if rel < 0.3:
        return Finding(
            "noise",
            f"the values changed by small amounts of relative size ~{rel:.2g} of their spread (estimated from the "
            "weighted sums, assuming independent changes)",
        )
    return Finding(
        "different", "it holds different values (not a rearrangement, scaling or noise of the expected ones)"
    )


def _arrangement(o: torch.Tensor, e: torch.Tensor, tol: float) -> Finding:
    names = {t: i for i, t in enumerate(TERMS)}
    rows_same = all(_close(o, e, names[t], tol) for t in ("row_p", "row_q"))
    cols_same = all(_close(o, e, names[t], tol) for t in ("col_p", "col_q"))
    if cols_same and not rows_same:
        return Finding(
            "rows_permuted", "it holds the expected values moved within their columns: rows permuted or swapped"
        )
    if rows_same and not cols_same:
        return Finding(
            "columns_permuted",
            "it holds the expected values moved within their rows: columns permuted (in some rows or all)",
        )
    return Finding("rearranged", "it holds the expected values in another arrangement (rows and columns moved)")


def _close(o: torch.Tensor, e: torch.Tensor, i: int, tol: float) -> bool:
    scale = max(float(_scales(o)[i]), float(_scales(e)[i]))
    return abs(float(o[i] - e[i])) <= tol * scale


def _scale_factor(o: torch.Tensor, e: torch.Tensor, eps: float) -> float | None:
    """c when the observed sums are c times the written ones, up to the dtype's rounding of c x; else None."""
    if e[3] == 0:
        return None
    c = float(o[3] / e[3]) * (1.0 if float(o[1]) * float(e[1]) >= 0 else -1.0)
    if abs(c - 1) <= 4 * max(eps, 1e-6):
        return None  # a factor this close to 1 is indistinguishable from rounding or noise
    slack = 4 * max(eps, 1e-6)
    lin = all(abs(float(o[i] - c * e[i])) <= slack * abs(c) * float(e[3]) for i in _LINEAR)
    return c if lin and abs(float(o[2]) - c * c * float(e[2])) <= 2 * slack * c * c * float(e[2]) else None


def _noise_estimate(o: torch.Tensor, e: torch.Tensor, shape: Sequence[int]) -> float:
    """Relative size of independent changes that would move the weighted sums this much (an estimate).

    Each position-weighted sum moves by ``sum d_k w_k``: for independent changes of spread s that has
    variance ``n s^2 E[w^2]`` (1 for the plain sum, 1/3 for one weight, 1/9 for two). Divided by the
    values' own spread ``sqrt(sum_sq / n)``.
    """
    n = max(1, math.prod(shape) if shape else 1)
    moments = {"sum": 1.0, "row_p": 1 / 3, "row_q": 1 / 3, "row_p_col_q": 1 / 9, "row_q_col_p": 1 / 9}
    if len(shape) >= 2:
        moments.update({"col_p": 1 / 3, "col_q": 1 / 3})
    var = sum(float(o[TERMS.index(t)] - e[TERMS.index(t)]) ** 2 / (n * m) for t, m in moments.items()) / len(moments)
    spread = math.sqrt(max(float(e[2]), 0.0) / n)
    return math.sqrt(var) / spread if spread > 0 else math.inf
