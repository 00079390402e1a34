"""Values against the fingerprints recorded at conversion: one rule for ``diagnose --values`` and the guard.

The caller computes the observed fingerprints its own way (diagnose streams the DCP files; the guard sums
every rank's shards of the live parameters), always of the values as they are, never a rounding of them, in
the checkpoint's key space. This module maps the recorded keys onto those (a nested checkpoint adds
``model.``), chooses for each key the recorded fingerprint that values of its dtype must match
(``expected_fingerprint``), compares, says what most likely happened, and states the coverage: how many of
the tensors had a fingerprint to check, and why the others had none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from flame_ext.fingerprints.algorithm import exact_widening, matches
from flame_ext.fingerprints.forensics import Finding, what_happened
from flame_ext.fingerprints.record import Fingerprints
from flame_ext.io.key_names import locate_keys
from flame_ext.report import Problem

__all__ = [
    "plan_verification",
    "Verification",
    "fingerprint_problems",
    "coverage_problems",
    "expected_fingerprint",
    "values_dtype",
    "hint_for",
    "differing_keys",
    "fold_swaps",
    "never_loaded",
    "never_loaded_problem",
]

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
        "the values are not those of any exact cast of the recorded ones (changed below the recorded dtype's "
        "resolution, or rounded another way than round-to-nearest): " + _RECONVERT
    ),
    "never_loaded": (
        "the weights were never loaded into the model this was saved from (or the load filled nothing): load the "
        "converted checkpoint before saving (torchtitan: checkpoint.initial_load_path, or the step-0 folder), or "
        "re-convert with `flame-ext convert`"
    ),
}
# Findings that tie a tensor to the recorded values (moved, scaled, rounded, another key's): any of them, and
# the tensors are not "never loaded".
_UNRELATED = frozenset({"different", "nonfinite", "zeros"})
_UNRECORDED_HINT = (
    "record fingerprints in this checkpoint's key space: `flame-ext convert` records every tensor it writes; a "
    "reference from `flame-ext reference` has the HF files' keys, which a checkpoint with other names (a "
    "torchtitan-native layout) does not match"
)


def hint_for(code: str | None) -> str:
    """What to do about a tensor whose values are not the ones written, by what most likely happened."""
    return _HINTS.get(code or "", "the tensor changed after it was written: " + _RECONVERT)


def values_dtype(held: str, stored: str | None = None) -> str:
    """The dtype whose values the observed tensor holds: the checkpoint's ``stored`` dtype when the load widened
    it exactly into ``held`` (a bf16 checkpoint in fp32 parameters holds bf16 values), else ``held``."""
    return stored if stored is not None and exact_widening(stored, held) else held


def expected_fingerprint(recorded: Fingerprints, key: str, dtype: str) -> tuple[list[float], str] | None:
    """The recorded fingerprint that values of ``dtype`` (``values_dtype``) under recorded ``key`` must match,
    with the dtype it was taken at; None when the record has none for that dtype (not verifiable).

    The plain fingerprint when ``dtype`` is the recorded one or an exact widening of it (bf16 -> fp32: the
    same numbers); else the fingerprint of the recorded values rounded to ``dtype``, if it was recorded. A
    legitimate cast then matches exactly, and a value changed below the recorded dtype's resolution does not.
    """
    stored, fp = recorded[key]
    if exact_widening(stored, dtype):
        return fp, stored
    rounded = getattr(recorded, "rounded", {}).get(key, {}).get(dtype)
    return (rounded, dtype) if rounded is not None else None


@dataclass
class Verification:
    """Which checkpoint keys are verified against which recorded fingerprint, and what was left out."""

    keys: dict[str, str] = field(default_factory=dict)  # checkpoint key -> recorded key (verifiable)
    unrecorded: list[str] = field(default_factory=list)  # checkpoint keys with no recorded fingerprint
    dtypes: dict[str, str] = field(default_factory=dict)  # checkpoint key -> dtype of its observed values
    # recorded, but not at its values' dtype: checkpoint key -> (its values' dtype, the recorded dtype)
    not_verifiable: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.keys) + len(self.unrecorded) + len(self.not_verifiable)

    @property
    def complete(self) -> bool:
        return not (self.unrecorded or self.not_verifiable)

    def coverage(self) -> str:
        """``N of M``: the tensors with a fingerprint to check, of all the tensors there are."""
        return f"{len(self.keys)} of {self.total}"


def plan_verification(
    recorded: Fingerprints, checkpoint_keys: Iterable[str], dtypes: Mapping[str, str] | None = None
) -> Verification:
    """Map recorded keys (HF or flat names) onto the checkpoint's keys; keys on neither side are listed.

    ``dtypes``: checkpoint key -> the dtype of the values that will be observed (``values_dtype``); a key whose
    record has no fingerprint at that dtype is listed as not verifiable, and not observed at all.
    """
    checkpoint_keys = sorted(checkpoint_keys)
    located = locate_keys(recorded, checkpoint_keys)
    keys = {ck: rk for rk, ck in located.items()}
    plan = Verification(unrecorded=[k for k in checkpoint_keys if k not in keys], dtypes=dict(dtypes or {}))
    for ck, rk in sorted(keys.items()):
        dtype = plan.dtypes.get(ck)
        if dtype is not None and expected_fingerprint(recorded, rk, dtype) is None:
            plan.not_verifiable[ck] = (dtype, recorded[rk][0])
        else:
            plan.keys[ck] = rk
    return plan


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
    """One ``value_mismatch`` per checkpoint key whose observed fingerprint is not the expected one.

    The dtype of each key's observed values is ``plan.dtypes`` (``plan_verification(dtypes=...)``), else
    ``stored_dtypes``, else the recorded dtype; it chooses the recorded fingerprint to compare with
    (``expected_fingerprint``). A key with none at its dtype is skipped here (``coverage_problems`` says so).
    ``written`` says when the record was made (a resume: "at the save of step 2"), ``hint`` what to do, by
    finding.
    """
    dtypes = {**(stored_dtypes or {}), **plan.dtypes}
    expected = _expected(recorded, plan, dtypes)
    problems, findings = [], {}
    for key in differing_keys(observed, recorded, plan, stored_dtypes):
        fp, at = expected[key]
        shape = tuple(shapes[key])
        others = {ck: e for ck, (e, d) in expected.items() if ck != key and d == at and tuple(shapes[ck]) == shape}
        finding = what_happened(key, observed[key], fp, shape=shape, dtype=at, others=others, tol=recorded.tolerance)
        findings[key] = finding
        held = dtypes.get(key, at)
        problems.append(_problem(key, finding, held, recorded[plan.keys[key]][0], f"{written}{where}", hint))
    compared = sum(1 for key in expected if key in observed)
    if never_loaded(list(findings.values()), compared):
        return [never_loaded_problem(list(findings.values()), f"the ones written {written}{where}", hint)]
    return fold_swaps(problems, findings, f"the ones written {written}{where}", hint)


def _expected(
    recorded: Fingerprints, plan: Verification, dtypes: Mapping[str, str]
) -> dict[str, tuple[list[float], str]]:
    expected = {}
    for key, rec_key in plan.keys.items():
        found = expected_fingerprint(recorded, rec_key, dtypes.get(key, recorded[rec_key][0]))
        if found is not None:
            expected[key] = found
    return expected


def differing_keys(
    observed: Mapping[str, torch.Tensor],
    recorded: Fingerprints,
    plan: Verification,
    stored_dtypes: Mapping[str, str] | None = None,
) -> list[str]:
    """The checkpoint keys whose observed fingerprint is not the expected one (the tensors that differ, however
    their problems are folded: what the guard's ``value_mismatches`` figure counts)."""
    expected = _expected(recorded, plan, {**(stored_dtypes or {}), **plan.dtypes})
    return [k for k, (fp, _) in expected.items() if k in observed and not matches(observed[k], fp, recorded.tolerance)]


def fold_swaps(
    problems: list[Problem], findings: Mapping[str, Finding], expected: str, hint: Callable[[str | None], str]
) -> list[Problem]:
    """Tensors of two modules that hold each other's values (layers 0 and 1 exchanged: 22 tensors of a tiny
    OLMo2) are one cause: one ``value_mismatch`` naming the two modules and the count, in place of one per
    tensor. Pairs are folded when each key holds exactly the other's values and the two names differ in one
    dotted part, two pairs or more of the same two parts."""
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for a, finding in findings.items():
        b = finding.other
        if finding.code != "swapped" or b is None or a > b or getattr(findings.get(b), "other", None) != a:
            continue
        pa, pb = a.split("."), b.split(".")
        diff = [i for i, (x, y) in enumerate(zip(pa, pb)) if x != y]
        if len(pa) == len(pb) and len(diff) == 1:
            i = diff[0]
            groups.setdefault((".".join(pa[:i]), pa[i], pb[i]), []).append((a, b))
    folded: dict[str, Problem] = {}
    for (parent, x, y), pairs in groups.items():
        if len(pairs) < 2:
            continue
        prefix = f"{parent}." if parent else ""
        problem = Problem(
            "value_mismatch",
            "error",
            None,
            f"{prefix}{x} and {prefix}{y} are swapped: {2 * len(pairs)} tensors hold each other's values instead "
            f"of {expected} (e.g. {pairs[0][0]} holds those of {pairs[0][1]})",
            hint("swapped"),
        )
        for a, b in pairs:
            folded[a], folded[b] = problem, problem
    out: list[Problem] = []
    for p in problems:
        if p.kind == "value_mismatch" and p.key in folded:
            if folded[p.key] not in out:
                out.append(folded[p.key])
        else:
            out.append(p)
    return out


def never_loaded(findings: list[Finding], compared: int) -> bool:
    """Every one of the ``compared`` tensors (two or more) differs, and none is tied to its expected values
    (moved, scaled, rounded, another key's): the weights were never there."""
    return compared >= 2 and len(findings) == compared and all(f.code in _UNRELATED for f in findings)


def never_loaded_problem(
    findings: list[Finding], expected: str, hint: Callable[[str | None], str] = hint_for
) -> Problem:
    """One cause, so one problem with the count, keyed to no tensor."""
    nonfinite = sum(1 for f in findings if f.code == "nonfinite")
    zeros = sum(1 for f in findings if f.code == "zeros")
    parts = [f"{nonfinite} hold NaN or inf"] * bool(nonfinite) + [f"{zeros} only zeros"] * bool(zeros)
    return Problem(
        "value_mismatch",
        "error",
        None,
        f"never loaded: all {len(findings)} tensors hold values unrelated to {expected}"
        + (f" ({', '.join(parts)})" if parts else "")
        + "; none is a rearrangement, scaling or rounding of them: uninitialised memory, as a model built on meta "
        "and materialised with to_empty() holds until its weights are loaded",
        hint("never_loaded"),
    )


def _problem(
    key: str, finding: Finding, held: str, recorded: str, where: str, hint: Callable[[str | None], str]
) -> Problem:
    cast = f" (values of {held}, recorded as {recorded})" if held != recorded else ""
    return Problem(
        "value_mismatch",
        "error",
        key,
        f"its values are not the ones written {where}: {finding.text}{cast}",
        hint(finding.code),
    )


def coverage_problems(plan: Verification, *, required: bool, what: str = "loaded") -> list[Problem]:
    """One ``manifest`` problem when some of the ``what`` tensors have no fingerprint to check, naming the count
    and each reason: a warning, or an error when verification is ``required`` (the user asked for every value).
    One problem, not one per reason: the ranks pool problems by (kind, severity, key)."""
    reasons, hints = [], []
    if plan.unrecorded:
        n, first = len(plan.unrecorded), ", ".join(plan.unrecorded[:3])
        reasons.append(f"no fingerprint recorded for {n} {what} tensors (e.g. {first})")
        hints.append(_UNRECORDED_HINT)
    by_dtype: dict[tuple[str, str], list[str]] = {}
    for key, dtypes in plan.not_verifiable.items():
        by_dtype.setdefault(dtypes, []).append(key)
    for (dtype, recorded), keys in sorted(by_dtype.items()):
        reasons.append(
            f"values of {len(keys)} tensors {what} as {dtype} are not verified: the record has no {dtype} "
            f"fingerprints (recorded as {recorded}; e.g. {keys[0]})"
        )
        hints.append(f"re-convert with this flame-ext (it records every training dtype) or at {dtype}")
    if not reasons:
        return []
    return [
        Problem(
            "manifest",
            "error" if required else "warning",
            None,
            f"values: {plan.coverage()} tensors verified: " + "; ".join(reasons),
            "; ".join(hints),
        )
    ]
