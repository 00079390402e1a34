"""Values against the fingerprints recorded at conversion: one rule for ``diagnose --values`` and the guard.

The caller computes the observed fingerprints its own way (diagnose streams the DCP files; the guard sums
every rank's shards of the live parameters) in the checkpoint's key space; this module maps the recorded
keys onto those (a nested checkpoint adds ``model.``), compares, and says what most likely happened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from flame_ext.checks.keys import locate_keys
from flame_ext.io.fingerprint import Finding, matches, what_happened
from flame_ext.io.manifest import Fingerprints
from flame_ext.report import Problem

__all__ = ["plan_verification", "Verification", "fingerprint_problems", "hint_for"]

_RECONVERT = "re-convert from the HF source with `flame-ext convert` (or check what wrote or edited this checkpoint)"
_HINTS = {
    "zeros": "the tensor was never written, or was zeroed after conversion: " + _RECONVERT,
    "swapped": "two keys hold each other's tensors (a key map that swaps layers or projections): " + _RECONVERT,
    "transposed": "a converter wrote it transposed (nn.Linear stores [out, in]): " + _RECONVERT,
    "rows_permuted": (
        "its rows were reordered: a q/k rotary permutation (interleaved vs rotate-half) or a head reorder applied "
        "or skipped by the converter: " + _RECONVERT
    ),
    "columns_permuted": "its input features were reordered: " + _RECONVERT,
    "rearranged": "its values were moved around (a wrong reshape or view): " + _RECONVERT,
    "scaled": "it was scaled after conversion (a folded norm, a scale applied twice): " + _RECONVERT,
    "rounding": (
        "the values went through another rounding than the recorded dtype: re-convert at the dtype you train "
        "in, or record the reference at the checkpoint's dtype (`flame-ext reference --dtype`)"
    ),
}


def hint_for(code: str | None) -> str:
    """What to do about a tensor whose values are not the ones written, by what most likely happened."""
    return _HINTS.get(code or "", "the tensor changed after it was written: " + _RECONVERT)


@dataclass
class Verification:
    """Which checkpoint keys are verified against which recorded fingerprint, and what was left out."""

    keys: dict[str, str] = field(default_factory=dict)  # checkpoint key -> recorded key
    unrecorded: list[str] = field(default_factory=list)  # checkpoint keys with no recorded fingerprint


def plan_verification(recorded: Fingerprints, checkpoint_keys: Iterable[str]) -> Verification:
    """Map recorded keys (HF or flat names) onto the checkpoint's keys; keys on neither side are listed."""
    checkpoint_keys = sorted(checkpoint_keys)
    located = locate_keys(recorded, checkpoint_keys)
    keys = {ck: rk for rk, ck in located.items()}
    return Verification(dict(sorted(keys.items())), [k for k in checkpoint_keys if k not in keys])


def fingerprint_problems(
    observed: Mapping[str, torch.Tensor],
    recorded: Fingerprints,
    plan: Verification,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    stored_dtypes: Mapping[str, str] | None = None,
    where: str = "",
    written: str = "at conversion",
    hint: Callable[[str | None], str] = hint_for,
) -> list[Problem]:
    """One ``value_mismatch`` per checkpoint key whose observed fingerprint is not the recorded one.

    ``stored_dtypes`` (checkpoint key -> dtype in the checkpoint) makes a rounding-level difference a
    warning when the checkpoint was deliberately stored at another dtype than the one recorded. ``written``
    says when the record was made (a resume: "at the save of step 2"), ``hint`` what to do, by finding.
    """
    problems = []
    for key, rec_key in plan.keys.items():
        dtype, expected = recorded[rec_key]
        if key not in observed or matches(observed[key], expected, recorded.tolerance):
            continue
        shape = tuple(shapes[key])
        others = {
            ck: recorded[rk][1]
            for ck, rk in plan.keys.items()
            if ck != key and tuple(shapes.get(ck, ())) == shape and recorded[rk][0] == dtype
        }
        finding = what_happened(
            key, observed[key], expected, shape=shape, dtype=dtype, others=others, tol=recorded.tolerance
        )
        stored = (stored_dtypes or {}).get(key, dtype)
        severity = "warning" if finding.code == "rounding" and stored != dtype else "error"
        problems.append(_problem(key, finding, severity, stored, dtype, f"{written}{where}", hint))
    return problems


def _problem(
    key: str, finding: Finding, severity: str, stored: str, recorded: str, where: str, hint: Callable[[str | None], str]
) -> Problem:
    cast = f" (stored as {stored}, recorded as {recorded})" if stored != recorded else ""
    return Problem(
        "value_mismatch",
        severity,  # type: ignore[arg-type]
        key,
        f"its values are not the ones written {where}: {finding.text}{cast}",
        hint(finding.code),
    )
