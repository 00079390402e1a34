"""``diagnose --values``: every tensor of the checkpoint against its HF source, streamed block by block.

Right-shaped wrong tensors (swapped layers, a transposed square projection, zeroed weights) pass every
key, shape and dtype check; only the values show them. Both sides are read one block of rows at a time
(HF by a positioned read of just those rows' bytes, DCP through a load plan for just those rows), so memory
stays near the block size whatever the model size, as in the converter.

Equal dtypes must match exactly. Across a dtype change the narrower dtype decides: both sides are
rounded to it and must then agree to within one unit in its last place (a conversion rounds once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flame_ext.io.dcp import DEFAULT_BUFFER_BYTES, DCPRowReader, row_blocks
from flame_ext.io.hf import HFCheckpoint, HFTensor, hf_source, read_tensor
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

__all__ = ["ValueStats", "compare_values", "narrower"]


@dataclass
class ValueStats:
    """What the value pass did: tensors compared, tensors skipped (with why), bytes read."""

    compared: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0


def narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with the coarser rounding (bf16 over fp16 over fp32); integer dtypes compare as themselves."""
    if not (a.is_floating_point and b.is_floating_point):
        return a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


@dataclass
class _TensorDiff:
    max_abs: float = 0.0
    mismatched: int = 0
    nonfinite_ckpt: int = 0
    nonfinite_hf: int = 0
    # Order-independent fingerprints (sum, sum of squares, in float64) of both sides: they recognise a
    # tensor that holds another key's values (swapped layers) or its own values rearranged (transposed).
    ckpt_fp: list[float] = field(default_factory=lambda: [0.0, 0.0])
    src_fp: list[float] = field(default_factory=lambda: [0.0, 0.0])


def _fingerprint(t: torch.Tensor, acc: list[float]) -> None:
    x = t.double()
    finite = torch.isfinite(x)
    x = torch.where(finite, x, torch.zeros_like(x))
    acc[0] += float(x.sum())
    acc[1] += float((x * x).sum())


def _compare_block(ckpt: torch.Tensor, src: torch.Tensor, diff: _TensorDiff) -> None:
    if ckpt.is_floating_point():
        diff.nonfinite_ckpt += int((~torch.isfinite(ckpt)).sum())
    if src.is_floating_point():
        diff.nonfinite_hf += int((~torch.isfinite(src)).sum())
    _fingerprint(ckpt, diff.ckpt_fp)
    _fingerprint(src, diff.src_fp)
    narrow = narrower(ckpt.dtype, src.dtype)
    a, b = ckpt.to(narrow), src.to(narrow)
    if narrow.is_floating_point:
        both_finite = torch.isfinite(a) & torch.isfinite(b)
        # float32 holds every bf16/fp16 value exactly, so differences of rounded values are exact too.
        gap = (a.float() - b.float()).abs()
        if ckpt.dtype == src.dtype:
            bad = (a != b) & both_finite
        else:
            # One rounding to the narrow dtype: after rounding both sides they may differ by one ulp at most.
            fi = torch.finfo(narrow)
            bad = (gap > fi.eps * b.float().abs() + fi.smallest_normal * fi.eps) & both_finite
        gap = torch.where(both_finite, gap, torch.zeros_like(gap))
    else:
        bad = a != b
        gap = (a.double() - b.double()).abs()
    diff.mismatched += int(bad.sum())
    if gap.numel():
        diff.max_abs = max(diff.max_abs, float(gap.max()))


def _same_fp(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))


def _explain(key: str, diff: _TensorDiff, spec: TensorSpec, others: dict[str, tuple[TensorSpec, list[float]]]) -> str:
    """What the wrong tensor holds instead, when that can be told from the fingerprints."""
    if diff.ckpt_fp[1] == 0.0 and diff.src_fp[1] != 0.0:
        return "; it holds only zeros"
    twins = sorted(k for k, (s, fp) in others.items() if k != key and s == spec and _same_fp(fp, diff.ckpt_fp))
    if twins:
        return f"; it holds the HF values of {twins[0]}" + (
            f" (or {len(twins) - 1} other identical tensors)" if len(twins) > 1 else ""
        )
    if _same_fp(diff.ckpt_fp, diff.src_fp):
        square = len(spec.shape) == 2 and spec.shape[0] == spec.shape[1]
        return "; it holds the HF values rearranged" + (" (transposed or permuted)" if square else " (permuted)")
    return ""


def _problems_for(
    key: str, ckpt_key: str, diff: _TensorDiff, ckpt_spec: TensorSpec, src: HFTensor, why: str
) -> list[Problem]:
    problems = []
    numel = ckpt_spec.numel
    where = f" (checkpoint key {ckpt_key})" if ckpt_key != key else ""
    if diff.nonfinite_ckpt:
        problems.append(
            Problem(
                "nonfinite",
                "error",
                key,
                f"{diff.nonfinite_ckpt} of {numel} values are NaN or inf in the checkpoint{where}",
                "a forward pass through this tensor yields NaN; re-convert from the HF source (and check what wrote "
                "this checkpoint)",
            )
        )
    if diff.nonfinite_hf:
        problems.append(
            Problem(
                "nonfinite",
                "error",
                key,
                f"{diff.nonfinite_hf} of {numel} values are NaN or inf in the HF source {src.file.name}",
                "the source model itself is damaged; re-download it",
            )
        )
    if diff.mismatched:
        rule = "" if ckpt_spec.dtype == src.spec.dtype else f" beyond {src.spec.dtype} -> {ckpt_spec.dtype} rounding"
        problems.append(
            Problem(
                "value_mismatch",
                "error",
                key,
                f"{diff.mismatched} of {numel} values differ from the HF source{rule}; max abs diff "
                f"{diff.max_abs:.4g}{why}{where}",
                "the right shape holding the wrong tensor (swapped layers, a transposed or permuted projection, a "
                "failed write): re-convert from the HF source with `flame-ext convert`",
            )
        )
    return problems


def compare_values(
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    hf: HFCheckpoint,
    key_map: dict[str, str],
    *,
    tied: dict[str, str],
    base_prefix: str,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES // 4,
) -> tuple[list[Problem], ValueStats]:
    """Compare each located checkpoint tensor with its HF source, block by block; every difference reported."""
    reader = DCPRowReader(folder)
    stats = ValueStats()
    diffs: dict[str, tuple[str, _TensorDiff, TensorSpec, HFTensor]] = {}
    for key in sorted(key_map):
        ckpt_key = key_map[key]
        spec = found.get(ckpt_key)
        src = hf_source(key, hf, tied, base_prefix)
        if spec is None or src is None:
            stats.skipped[key] = "no HF source tensor (freshly initialised?)" if src is None else "not a tensor"
            continue
        if spec.shape != src.spec.shape:
            stats.skipped[key] = "shapes differ (see the shape problem)"
            continue
        diff = _TensorDiff()
        for start, end in row_blocks(spec, buffer_bytes):
            ckpt = reader.rows(ckpt_key, spec, start, end)
            whole = not spec.shape or (start, end) == (0, spec.shape[0])
            source = read_tensor(src, None if whole else (start, end))
            _compare_block(ckpt, source, diff)
            stats.bytes_read += ckpt.numel() * ckpt.element_size() + source.numel() * source.element_size()
            del ckpt, source
        stats.compared += 1
        diffs[key] = (ckpt_key, diff, spec, src)
    hf_prints = {k: (src.spec, d.src_fp) for k, (_, d, _, src) in diffs.items() if src.spec.dtype == diffs[k][2].dtype}
    problems: list[Problem] = []
    for key, (ckpt_key, diff, spec, src) in diffs.items():
        why = _explain(key, diff, spec, hf_prints) if diff.mismatched and spec.dtype == src.spec.dtype else ""
        problems.extend(_problems_for(key, ckpt_key, diff, spec, src, why))
    return problems, stats
