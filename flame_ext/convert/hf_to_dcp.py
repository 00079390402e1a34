"""HF -> DCP, streaming.

The mapping is worked out from metadata first (which source tensor feeds each key the model asks for,
at which dtype), every problem with it is reported at once, and only then are tensors read, one block at
a time, straight into the output. The output folder appears only when complete (see ``io.destination``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flame_ext.command_options import ConvertOptions, HeadType
from flame_ext.convert.alongside import ForwardBeside, forward_beside
from flame_ext.convert.summary import Progress, Summary, nonfinite_warning, peak_rss_mb
from flame_ext.errors import CheckpointFormatError, FlameExtError
from flame_ext.fingerprints.algorithm import Recorder, nonfinite_keys
from flame_ext.fingerprints.record import fingerprints_section
from flame_ext.io.dcp import LAYOUTS, replace_dtype
from flame_ext.io.dcp_save import WriteEntry, save_streaming
from flame_ext.io.destination import atomic_folder, check_destination
from flame_ext.io.digests import FILES_SECTION, digest_files, files_section, written_files
from flame_ext.io.hf import (
    HFCheckpoint,
    HFTensor,
    build_meta_model,
    expected_tensors,
    hf_source,
    map_tensor,
    open_hf,
    tied_aliases,
)
from flame_ext.io.manifest import MANIFEST_NAME, build_manifest, write_manifest
from flame_ext.io.specs import TensorSpec, dtype_name
from flame_ext.model.future_predictor import ATTRIBUTE as FP_ATTRIBUTE
from flame_ext.model.future_predictor import attach_future_predictor
from flame_ext.model.reference_loss import ReferenceForward
from flame_ext.process import resume_collector
from flame_ext.titan.native import NativeModel, is_native

__all__ = [
    "ConvertOptions",
    "ConversionPlan",
    "complete_manifest",
    "convert_hf_to_dcp",
    "plan_hf_to_dcp",
    "prepare_reference_forward",
    "prepare_conversion",
    "source_reader",
]


def source_reader(t: HFTensor, dtype: str) -> Any:
    """``read_rows(start, end)`` of HF tensor ``t`` as stored at ``dtype`` (a view of the file when no cast)."""
    out_dtype = getattr(torch, dtype)

    def read_rows(start: int, end: int) -> torch.Tensor:
        if not t.spec.shape:
            return map_tensor(t).to(out_dtype)
        if getattr(torch, t.spec.dtype) == out_dtype:
            return map_tensor(t, (start, end))  # pages of the source file, passed on without a copy
        # A dtype change converts the source in slices into the result, so a whole source block (twice
        # the size of the result for float32 -> bfloat16) is never mapped beside it.
        out = torch.empty((end - start, *t.spec.shape[1:]), dtype=out_dtype)
        step = max(1, (end - start) // 8)
        for a in range(start, end, step):
            b = min(a + step, end)
            out[a - start : b - start] = map_tensor(t, (a, b))
        return out

    return read_rows


def _fresh_reader(value: torch.Tensor) -> Any:
    return lambda start, end: value[start:end] if value.dim() else value


def plan_hf_to_dcp(
    hf: HFCheckpoint, model: torch.nn.Module, *, dtype: str, layout: str, fresh: dict[str, torch.Tensor]
) -> tuple[list[WriteEntry], list[str]]:
    """Map every key the model asks for to its source; raise once listing every key that cannot be fed."""
    expected = expected_tensors(model)
    aliases = tied_aliases(model)
    base_prefix = getattr(model, "base_model_prefix", "model") + "."
    entries: list[WriteEntry] = []
    missing, shape_errors, used = [], [], set()
    for key, spec in expected.items():
        out_key = LAYOUTS[layout] + key
        if key in fresh:
            value = fresh[key]
            entries.append(
                WriteEntry(out_key, TensorSpec(tuple(value.shape), dtype_name(value.dtype)), _fresh_reader(value))
            )
            continue
        src = hf_source(key, hf, aliases, base_prefix)
        if src is None:
            missing.append(key)
            continue
        if src.spec.shape != spec.shape:
            shape_errors.append(f"{key}: HF file has {src.spec.shape}, model asks for {spec.shape}")
            continue
        used.add(src.key)
        out_spec = replace_dtype(src.spec, None if dtype == "auto" else dtype)
        entries.append(WriteEntry(out_key, out_spec, source_reader(src, out_spec.dtype), src.file))
    if missing or shape_errors:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} keys the model asks for are not in the HF files: {', '.join(sorted(missing))}"
            )
        if shape_errors:
            parts.append(f"{len(shape_errors)} shape mismatches: {'; '.join(shape_errors)}")
        raise CheckpointFormatError(f"{hf.source}: cannot convert: " + " | ".join(parts))
    notes = [
        f"HF tensor {k} is not asked for by {type(model).__name__}; not written" for k in sorted(set(hf.tensors) - used)
    ]
    return entries, notes


def _fresh_tensors(model: torch.nn.Module, head_type: HeadType | None, dtype: str) -> dict[str, torch.Tensor]:
    """Attach the future predictor on ``meta`` (for the keys) and initialise a real copy (for the values)."""
    if head_type is None:
        return {}
    attach_future_predictor(model, head_type)
    torch.manual_seed(0)  # fresh but reproducible: the same conversion writes the same bytes
    from flame_ext.model.future_predictor import FuturePredictorHead, hidden_size

    head = FuturePredictorHead(hidden_size(model), head_type)
    out_dtype = getattr(torch, "float32" if dtype == "auto" else dtype)
    return {f"{FP_ATTRIBUTE}.{k}": v.detach().to(out_dtype) for k, v in head.state_dict().items()}


def _reference_dtype(hf: HFCheckpoint, entries: list[WriteEntry]) -> str:
    floats = [e.spec.dtype for e in entries if getattr(torch, e.spec.dtype).is_floating_point]
    return max(set(floats), key=floats.count) if floats else "float32"


@dataclass
class ConversionPlan:
    """What a conversion writes, worked out from metadata alone (every rank of a distributed run makes the same)."""

    hf: HFCheckpoint
    fresh: dict[str, torch.Tensor]
    entries: list[WriteEntry]
    notes: list[str]
    parameters: int
    # torchtitan's own model (``--layout torchtitan:<module>``), None for HF names.
    native: NativeModel | None = None
    # Entries written together (a native layer: one from_hf call); a distributed run gives a rank whole groups.
    groups: list[list[WriteEntry]] | None = None


def prepare_conversion(opts: ConvertOptions) -> ConversionPlan:
    """Open the source, build the model on ``meta`` and map every key; raises before anything is written."""
    hf = open_hf(opts.model)
    if is_native(opts.layout):
        return _prepare_native(hf, opts)
    model = build_meta_model(hf, trust_remote_code=opts.trust_remote_code)
    fresh = _fresh_tensors(model, opts.future_predictor, opts.dtype)
    entries, notes = plan_hf_to_dcp(hf, model, dtype=opts.dtype, layout=opts.layout, fresh=fresh)
    return ConversionPlan(hf, fresh, entries, notes, _parameter_count(model, entries, LAYOUTS[opts.layout]))


def _prepare_native(hf: HFCheckpoint, opts: ConvertOptions) -> ConversionPlan:
    """``--layout torchtitan:<module>``: the native keys, layer by layer through the model's adapter."""
    from flame_ext.convert.native import plan_native
    from flame_ext.titan.native import resolve_native

    native = resolve_native(opts.layout, opts.titan_config, str(hf.path))
    allowed = _config_parity(hf, native.model_config, opts)  # before any tensor is planned or written
    nplan = plan_native(hf, native, dtype=opts.dtype)
    tied = set(nplan.tied)
    parameters = sum(e.spec.numel for e in nplan.entries if e.key not in tied)
    notes = allowed + nplan.notes
    return ConversionPlan(hf, nplan.fresh, nplan.entries, notes, parameters, native, nplan.groups)


def _config_parity(hf: HFCheckpoint, model_config: object, opts: ConvertOptions) -> list[str]:
    """The torchtitan config against the HF config (torchtitan #3772: a rope theta silently 10000 for 1e6):
    refused at one line per disagreement; the notes of those ``--allow-config-mismatch`` allows."""
    from flame_ext.checks.config.native import native_config_problems, refuse_config_mismatch

    problems = native_config_problems(
        model_config,
        hf.config,
        native_name=f"{opts.layout} --titan-config {opts.titan_config}",
        hf_name=f"{hf.source}/config.json",
        allow=opts.allow_config_mismatch,
    )
    refuse_config_mismatch(problems)
    return [f"config mismatch allowed by --allow-config-mismatch: {p.key}: {p.detail}" for p in problems]


def complete_manifest(
    summary: Summary,
    plan: ConversionPlan,
    opts: ConvertOptions,
    nonfinite: list[str],
    fingerprints: dict,
    forward: "ForwardBeside | ReferenceForward | None" = None,
    rounded: dict | None = None,
) -> dict[str, Any]:
    """After every tensor is written: the reference loss, the warnings and ``summary.manifest`` (returned).

    ``fingerprints`` and ``rounded`` are the recorder's (``fingerprints.algorithm.Recorder``): the values as written,
    and rounded to the other training dtypes.

    ``forward``: the reference forward prepared (and perhaps already run beside the writer); None prepares and
    runs it here when ``opts.reference`` asks for one (and the source holds no NaN or Inf).
    """
    hf, entries = plan.hf, plan.entries
    if nonfinite:
        summary.warnings.append(nonfinite_warning(nonfinite, hf.source))
    reference, reference_note, unavailable = _reference(plan, opts, forward, nonfinite)
    if reference_note:
        summary.warnings.append(reference_note)
    if reference is not None:
        summary.notes += reference.get("notes", [])
    manifest = _manifest(hf, opts, entries, plan.fresh, reference, plan.parameters)
    if plan.native is not None:
        manifest["native"] = plan.native.record()
    manifest.update(nonfinite_keys=nonfinite, reference_note=reference_note)
    dtypes = {e.key: e.spec.dtype for e in entries}
    manifest["fingerprints"] = fingerprints_section(fingerprints, dtypes, rounded)
    summary.manifest = manifest
    if unavailable:
        manifest["reference_unavailable"] = unavailable
        summary.notes.append(
            f"no reference loss recorded: {unavailable}. The weights are converted and the training guard runs "
            "every other check. To add the loss gate, on a machine with a GPU run `flame-ext reference --model "
            f"{hf.source} --out REF.json` and set checkpoint.initial_load_reference = REF.json"
        )
    return manifest


def prepare_reference_forward(plan: ConversionPlan, opts: ConvertOptions) -> "ReferenceForward | None":
    """The reference forward up to its first weight read (tokenizer, batch, the model on ``meta``), or None
    with ``--no-reference``. Its bad input is refused here, before anything is written."""
    if not opts.reference:
        return None
    from flame_ext.model.reference_loss import prepare_reference

    return prepare_reference(
        plan.hf,
        text_path=opts.reference_text,
        seq_len=opts.reference_seq_len,
        rows=opts.reference_rows,
        dtype=_reference_dtype(plan.hf, plan.entries),
        trust_remote_code=opts.trust_remote_code,
        device=opts.reference_device,
    )


def convert_hf_to_dcp(opts: ConvertOptions) -> Summary:
    """Convert; returns the summary. Raises ``FlameExtError`` for anything the user can fix.

    The plan comes first, from the model class built on ``meta`` (so every missing key is reported before
    a byte is written). Building it while already streaming a guessed plan was tried and dropped: the
    import's Python work and the writer threads' Python work share one GIL, and on two cores the overlap
    made the conversion slower, not faster.
    """
    t0 = time.perf_counter()
    check_destination(opts.checkpoint, kind="dcp", force=opts.force)
    plan = prepare_conversion(opts)
    summary = Summary(Path(opts.checkpoint).absolute(), notes=list(plan.notes), parameters=plan.parameters)
    entries = plan.entries
    total = sum(e.spec.nbytes for e in entries)
    recorder = Recorder({e.key: e.spec.shape for e in entries}, rounded=True)
    on_block = recorder.add_rows
    try:
        fwd = prepare_reference_forward(plan, opts)
    except FlameExtError:  # e.g. no tokenizer: prepared again, and so raised again, after the writing unless the
        fwd = None  # source holds NaN or Inf (then there is no reference to compute: a warning, and success)
    resume_collector()  # start-up is over: the tensor data follows
    with atomic_folder(opts.checkpoint, kind="dcp", force=opts.force) as tmp:
        # The reference forward runs beside the writer (see ``convert.alongside``): reading its own copy of
        # each block from the source, it is bounded by one block, and the wall time is about the longer of
        # the two instead of their sum.
        with forward_beside(fwd if isinstance(fwd, ReferenceForward) else None) as beside:
            with Progress(total, opts.progress, "convert") as bar:
                save_streaming(
                    tmp,
                    entries,
                    buffer_bytes=opts.buffer_bytes,
                    on_written=bar.update,
                    on_block=beside.guard(on_block) if beside else on_block,
                    direct=not opts.record_sha256,  # hashed just below: kept in the page cache for that
                )
            if beside:
                beside.wait(opts.progress)
        manifest = complete_manifest(
            summary, plan, opts, nonfinite_keys(recorder.values), recorder.values, beside or fwd, recorder.rounded
        )
        if opts.record_sha256:
            manifest[FILES_SECTION] = files_section(digest_files(tmp, written_files(tmp, MANIFEST_NAME)))
        write_manifest(tmp, manifest)
    summary.tensors = len(entries)
    summary.bytes = total
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def _reference(
    plan: ConversionPlan,
    opts: ConvertOptions,
    forward: "ForwardBeside | ReferenceForward | None",
    nonfinite: list[str],
) -> tuple[dict | None, str | None, str | None]:
    """The HF reference record, or None with the reason it was not recorded (a warning), or None with why the
    model cannot run on this machine (fla's Triton kernels without a GPU; never another failure)."""
    if not opts.reference:
        return None, None, None
    if nonfinite:
        return (
            None,
            (
                f"reference loss not computed: {len(nonfinite)} source tensors hold NaN or Inf, so the HF model's loss "
                "is not a reference a checkpoint could be checked against"
            ),
            None,
        )
    from flame_ext.errors import ForwardUnavailableError
    from flame_ext.model.reference_loss import NonFiniteReference, reference_record

    try:
        if forward is None:
            forward = prepare_reference_forward(plan, opts)
        if isinstance(forward, ForwardBeside):
            if forward.unavailable:
                return None, None, forward.unavailable
            fwd = forward.fwd
        elif forward is None:  # prepared only with opts.reference, checked above
            return None, None, None
        else:
            fwd = forward
            fwd.run()
        reference = reference_record(fwd, opts.reference_text)
    except NonFiniteReference as exc:
        return None, f"reference loss not recorded: {exc}", None
    except ForwardUnavailableError as exc:
        return None, None, str(exc)
    return reference, None, None


def _parameter_count(model: torch.nn.Module, entries: list[WriteEntry], prefix: str) -> int:
    """Elements of the model's state, a tied pair counted once (as ``model.num_parameters()`` counts it).

    The checkpoint holds both names of a tied tensor (the load asks for both), but it is one parameter.
    """
    aliases = {prefix + k for k in tied_aliases(model)}
    return sum(e.spec.numel for e in entries if e.key not in aliases)


def _manifest(
    hf: HFCheckpoint,
    opts: ConvertOptions,
    entries: list[WriteEntry],
    fresh: dict,
    reference: dict | None,
    parameters: int,
) -> dict:
    prefix = LAYOUTS.get(opts.layout, "")  # torchtitan's native keys are flat
    return build_manifest(
        "checkpoint",
        hf,
        layout=opts.layout,
        dtype=opts.dtype,
        tensors={e.key: {"shape": list(e.spec.shape), "dtype": e.spec.dtype, "numel": e.spec.numel} for e in entries},
        total_parameters=parameters,
        fresh_keys=sorted(prefix + k for k in fresh),
        future_predictor=opts.future_predictor,
        reference=reference,
    )
