"""``diagnose --values``: every tensor of the checkpoint against its HF source, streamed block by block.

Right-shaped wrong tensors (swapped layers, a transposed square projection, zeroed weights) pass every
key, shape and dtype check; only the values show them. Both sides are read one block of rows at a time
(HF by a positioned read of just those rows' bytes, DCP through a load plan for just those rows), so memory
stays near the block size whatever the model size, as in the converter.

Equal dtypes must match exactly. Across a dtype change the narrower dtype decides: both sides are
rounded to it and must then agree to within one unit in its last place (a conversion rounds once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flame_ext.fingerprints.algorithm import TERMS, block_fingerprint
from flame_ext.fingerprints.compare import (
    coverage_problems,
    fingerprint_problems,
    fold_swaps,
    hint_for,
    never_loaded,
    never_loaded_problem,
    plan_verification,
)
from flame_ext.fingerprints.forensics import Finding, what_happened
from flame_ext.fingerprints.record import Fingerprints
from flame_ext.io.dcp import DEFAULT_BUFFER_BYTES, DCPRowReader, row_blocks
from flame_ext.io.hf import HFCheckpoint, HFTensor, hf_source, read_tensor
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

__all__ = [
    "ValueStats",
    "Tolerance",
    "Source",
    "compare_values",
    "compare_with_sources",
    "narrower",
    "verify_fingerprints",
    "stored_fingerprints",
]


@dataclass
class ValueStats:
    """What the value pass did: tensors compared, tensors skipped (with why), bytes read."""

    compared: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    total: int = 0  # the tensors there are to verify (compared + skipped)


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
    # Fingerprints of both sides (fingerprints.algorithm): they tell what the wrong tensor holds instead (another
    # key's values, its own transposed or permuted, scaled, rounded).
    ckpt_fp: torch.Tensor = field(default_factory=lambda: torch.zeros(len(TERMS), dtype=torch.float64))
    src_fp: torch.Tensor = field(default_factory=lambda: torch.zeros(len(TERMS), dtype=torch.float64))


# Values per elementwise comparison: the float64 temporaries (8 MB each) stay below glibc's mmap threshold, so
# their memory is reused; whole 64 MB blocks made each temporary a fresh mapping, page-faulted in again for every
# block (12 million minor faults and 20 s of system time for a 1 GB checkpoint on this project's machine).
_COMPARE_CHUNK = 1 << 20
_NONFINITE = TERMS.index("nonfinite")


def _compare_block(
    ckpt: torch.Tensor, src: torch.Tensor, diff: _TensorDiff, start: int, shape: tuple[int, ...], tol: Tolerance
) -> None:
    offsets = [start] + [0] * (len(shape) - 1) if shape else []
    workers = torch.get_num_threads()  # diagnose's own process: see stored_fingerprints
    ckpt_fp = block_fingerprint(ckpt, offsets, shape, workers=workers)
    src_fp = block_fingerprint(src, offsets, shape, workers=workers)
    diff.ckpt_fp += ckpt_fp
    diff.src_fp += src_fp
    diff.nonfinite_ckpt += int(ckpt_fp[_NONFINITE])  # what the fingerprint counts: NaN and inf values
    diff.nonfinite_hf += int(src_fp[_NONFINITE])
    a, b = ckpt.reshape(-1), src.reshape(-1)
    torch.set_num_threads(1)  # per chunk, an OpenMP team's barriers cost more than its threads bring
    try:
        for i in range(0, a.numel(), _COMPARE_CHUNK):
            _compare_values(a[i : i + _COMPARE_CHUNK], b[i : i + _COMPARE_CHUNK], diff, tol)
    finally:
        torch.set_num_threads(workers)


def _compare_values(ckpt: torch.Tensor, src: torch.Tensor, diff: _TensorDiff, tol: Tolerance) -> None:
    """Count the values that differ beyond what the dtypes (or ``tol``) allow, and the largest gap."""
    # A deliberate tolerance compares the values as stored (float64 holds both exactly); without one, both
    # sides are rounded to the narrower dtype first, as a conversion does.
    narrow = torch.float64 if tol.given and ckpt.is_floating_point() else narrower(ckpt.dtype, src.dtype)
    a, b = ckpt.to(narrow), src.to(narrow)
    if torch.equal(a, b):  # the healthy case, in one pass: no gap, nothing differs (a NaN makes it unequal)
        return
    if narrow.is_floating_point:
        both_finite = torch.isfinite(a) & torch.isfinite(b)
        # float32 holds every bf16/fp16 value exactly, so differences of rounded values are exact too.
        gap = (a.double() - b.double()).abs()
        if tol.given:
            bad = (gap > tol.atol + tol.rtol * b.abs()) & both_finite
        elif ckpt.dtype == src.dtype:
            bad = (a != b) & both_finite
        else:
            # One rounding to the narrow dtype: after rounding both sides they may differ by one ulp at most.
            fi = torch.finfo(narrow)
            bad = (gap > fi.eps * b.double().abs() + fi.smallest_normal * fi.eps) & both_finite
        gap = torch.where(both_finite, gap, torch.zeros_like(gap))
    else:
        bad = a != b
        gap = (a.double() - b.double()).abs()
    diff.mismatched += int(bad.sum())
    if gap.numel():
        diff.max_abs = max(diff.max_abs, float(gap.max()))


@dataclass(frozen=True)
class Tolerance:
    """A deliberate elementwise tolerance (``--atol/--rtol``): |ckpt - hf| <= atol + rtol |hf| passes."""

    atol: float = 0.0
    rtol: float = 0.0

    @property
    def given(self) -> bool:
        return self.atol > 0 or self.rtol > 0


def _explain(
    key: str, diff: _TensorDiff, spec: TensorSpec, others: dict[str, tuple[TensorSpec, torch.Tensor]]
) -> Finding:
    """What the wrong tensor holds instead, told from the fingerprints (fingerprints.algorithm.what_happened)."""
    twins = {k: fp for k, (s, fp) in others.items() if s == spec}
    return what_happened(key, diff.ckpt_fp, diff.src_fp, shape=spec.shape, dtype=spec.dtype, others=twins)


@dataclass(frozen=True)
class Source:
    """What a checkpoint tensor should hold: its spec, a reader of rows [start, end) of it, and the words that
    name it in a problem (``the HF source`` and the file; for a native checkpoint, the adapter's mapping)."""

    spec: TensorSpec
    read_rows: Callable[[int, int], torch.Tensor]
    name: str = "the HF source"
    origin: str = ""  # where the values come from, in the nonfinite problem (an HF file name)


def hf_tensor_source(src: HFTensor) -> Source:
    """An HF safetensors tensor as a ``Source`` (rows read by a positioned read of just their bytes)."""
    whole = (0, src.spec.shape[0]) if src.spec.shape else None
    return Source(
        src.spec,
        lambda start, end: read_tensor(src, None if whole is None or (start, end) == whole else (start, end)),
        origin=f"the HF source {src.file.name}",
    )


def _problems_for(
    key: str, ckpt_key: str, diff: _TensorDiff, ckpt_spec: TensorSpec, src: Source, finding: Finding | None
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
                f"{diff.nonfinite_hf} of {numel} values are NaN or inf in {src.origin or src.name}",
                "the source model itself is damaged; re-download it",
            )
        )
    if diff.mismatched:
        rule = "" if ckpt_spec.dtype == src.spec.dtype else f" beyond {src.spec.dtype} -> {ckpt_spec.dtype} rounding"
        why = f"; {finding.text}" if finding is not None and finding.code != "nonfinite" else ""
        problems.append(
            Problem(
                "value_mismatch",
                "error",
                key,
                f"{diff.mismatched} of {numel} values differ from {src.name}{rule}; max abs diff "
                f"{diff.max_abs:.4g}{why}{where}",
                hint_for(finding.code if finding is not None else None),
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
    tolerance: Tolerance = Tolerance(),
) -> tuple[list[Problem], ValueStats]:
    """Compare each located checkpoint tensor with its HF source, block by block; every difference reported."""
    sources: dict[str, Source | None] = {}
    for key in sorted(key_map):
        src = hf_source(key, hf, tied, base_prefix)
        sources[key] = hf_tensor_source(src) if src is not None else None
    return compare_with_sources(folder, found, sources, key_map, buffer_bytes=buffer_bytes, tolerance=tolerance)


def compare_with_sources(
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    sources: dict[str, Source | None],
    key_map: dict[str, str],
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES // 4,
    tolerance: Tolerance = Tolerance(),
) -> tuple[list[Problem], ValueStats]:
    """Each checkpoint tensor (``key_map``: model key -> checkpoint key) against what ``sources`` says it
    should hold, in the order of ``sources``, block by block; a key without a source is skipped and said so."""
    reader = DCPRowReader(folder)
    stats = ValueStats()
    diffs: dict[str, tuple[str, _TensorDiff, TensorSpec, Source]] = {}
    for key, src in sources.items():
        ckpt_key = key_map.get(key)
        spec = found.get(ckpt_key) if ckpt_key is not None else None
        if ckpt_key is None:
            continue
        if spec is None or src is None:
            stats.skipped[key] = "no HF source tensor (freshly initialised?)" if src is None else "not a tensor"
            continue
        if spec.shape != src.spec.shape:
            stats.skipped[key] = "shapes differ (see the shape problem)"
            continue
        diff = _TensorDiff()
        for start, end in row_blocks(spec, buffer_bytes):
            ckpt = reader.rows(ckpt_key, spec, start, end)
            source = src.read_rows(start, end)
            _compare_block(ckpt, source, diff, start, spec.shape, tolerance)
            stats.bytes_read += ckpt.numel() * ckpt.element_size() + source.numel() * source.element_size()
            del ckpt, source
        stats.compared += 1
        diffs[key] = (ckpt_key, diff, spec, src)
    hf_prints = {k: (src.spec, d.src_fp) for k, (_, d, _, src) in diffs.items() if src.spec.dtype == diffs[k][2].dtype}
    problems: list[Problem] = []
    findings: dict[str, Finding | None] = {}
    for key, (ckpt_key, diff, spec, src) in diffs.items():
        finding = _explain(key, diff, spec, hf_prints) if diff.mismatched and spec.dtype == src.spec.dtype else None
        if diff.mismatched or diff.nonfinite_ckpt:
            findings[key] = finding
        problems.extend(_problems_for(key, ckpt_key, diff, spec, src, finding))
    known = {k: f for k, f in findings.items() if f is not None}
    if len(known) == len(findings) and never_loaded(list(known.values()), len(diffs)):  # one cause: one problem
        return [never_loaded_problem(list(known.values()), "the HF source's")], stats
    return fold_swaps(problems, known, "the HF source's", hint_for), stats


def stored_fingerprints(
    reader: DCPRowReader, specs: Mapping[str, TensorSpec], buffer_bytes: int
) -> dict[str, torch.Tensor]:
    """The fingerprint of each checkpoint tensor of ``specs``, values as stored, streamed from the files in row
    blocks (the next block read while this one is summed).

    The sums take every core torch was given, each worker single-threaded (``block_fingerprint``): diagnose
    owns its process. With torch's own intra-op threads instead, every small operation waits for the whole
    OpenMP team: on this project's 2-core machine, with other work running, 1 GB took 2.4 CPU-s and 3.5 s wall
    that way against 0.45 CPU-s and 0.8 s single-threaded.
    """
    workers = torch.get_num_threads()
    observed = {key: torch.zeros(len(TERMS), dtype=torch.float64) for key in specs}
    for key, start, block in reader.stream(specs, buffer_bytes):
        shape = specs[key].shape
        offsets = [start] + [0] * (len(shape) - 1) if shape else []
        observed[key] += block_fingerprint(block, offsets, shape, workers=workers)
    return observed


def verify_fingerprints(
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    recorded: Fingerprints,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES // 4,
) -> tuple[list[Problem], ValueStats]:
    """Every checkpoint tensor against the fingerprint recorded when it was written; the HF source is not read.

    The values are summed as stored; the stored dtype chooses the recorded fingerprint they must match
    (``fingerprints.compare``). A tensor with no fingerprint to check is an error: ``--values`` asks for all.
    """
    tensors = {k: s for k, s in found.items() if s is not None}
    plan = plan_verification(recorded, tensors, {k: s.dtype for k, s in tensors.items()})
    reader = DCPRowReader(folder)
    stats = ValueStats(total=plan.total)
    observed = stored_fingerprints(reader, {key: tensors[key] for key in plan.keys}, buffer_bytes)
    stats.bytes_read = sum(tensors[key].nbytes for key in plan.keys)
    stats.compared = len(plan.keys)
    stats.skipped.update({k: "no recorded fingerprint" for k in plan.unrecorded})
    stats.skipped.update({k: f"not verified at {d}" for k, (d, _) in plan.not_verifiable.items()})
    shapes = {k: tensors[k].shape for k in plan.keys}
    problems = fingerprint_problems(observed, recorded, plan, shapes)
    return problems + coverage_problems(plan, required=True, what="stored"), stats
