"""``flame-ext diagnose`` on a torchtitan-native checkpoint (``convert --layout torchtitan:<module>``).

The manifest's ``native`` block names the torchtitan model (its module and config function, as the run's
``--module`` and ``--config`` choose it); the same model and state-dict adapter the conversion used are
resolved again (``titan.native``), so every pass works in torchtitan's key space:

- metadata: the keys, shapes and dtypes torchtitan's model asks for (built on ``meta``) against ``.metadata``;
  HF names in the checkpoint are the one ``layout`` problem; the torchtitan config against the HF config
  (``checks.config.native``);
- ``--values``: against the HF source mapped through the adapter, a layer at a time, as the conversion maps it
  (``convert.native.plan_native``), when ``--model`` is given; otherwise against the fingerprints the
  conversion recorded in the native key space, without reading the HF files;
- ``--loss``: torchtitan's own model class on the CPU against the HF reference loss (``titan.native_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame_ext.checks.keys import compare_specs, model_part
from flame_ext.checks.recorded import recorded_choices
from flame_ext.commands.diagnose_passes import (
    DiagnoseOptions,
    _Context,
    _use_reference_file,
    config_reading_problems,
    files_pass,
    manifest_problems,
    recorded_source,
    token_threshold,
    values_against_record,
)
from flame_ext.io.hf import open_hf
from flame_ext.io.manifest import MANIFEST_NAME
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Report

__all__ = ["native_record", "diagnose_native"]


def native_record(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's ``native`` block (a checkpoint in torchtitan's own key names), None for HF names."""
    record = (manifest or {}).get("native")
    return record if isinstance(record, dict) else None


def diagnose_native(
    opts: DiagnoseOptions,
    found: dict[str, TensorSpec | None],
    manifest: dict[str, Any],
    reference: dict[str, Any] | None,
    digests: Any,
    on_stage: Callable[[str], None],
) -> Report:
    """Every pass asked for, in torchtitan's key space; ``reference`` is the read ``--reference`` file."""
    from flame_ext.checks.config.native import native_config_problems
    from flame_ext.titan.native import NATIVE_PREFIX, resolve_native, state_specs

    folder = Path(opts.checkpoint)
    record = native_record(manifest) or {}
    recorded = opts.model is None
    if recorded:
        opts.model = recorded_source(folder, manifest)
    hf = open_hf(opts.model)
    layout = NATIVE_PREFIX + str(record.get("module"))
    on_stage(f"building torchtitan's {record.get('module')} model on meta")
    native = resolve_native(layout, record.get("config"), str(hf.path))
    model = native.meta_model()
    expected = state_specs(model)
    have: dict[str, TensorSpec | None] = dict(model_part(found))
    parity = compare_specs(expected, have, choices=recorded_choices(manifest), native_module=str(record.get("module")))
    report = Report(checked=["metadata", "manifest", "config"])
    report.extend(parity.problems)
    report.counts = dict(parity.counts)
    report.notes.extend(parity.notes)
    report.notes.append(
        f"torchtitan's own {native.name} model ({layout}, config {record.get('config')}, flavor {native.flavor}): "
        f"keys checked in its key space, {type(native.adapter).__name__} maps the HF source"
    )
    if recorded:
        report.notes.insert(0, f"model: {opts.model}, the source recorded in {MANIFEST_NAME} (--model not given)")
    key_map = {k: k for k in expected if k in have}
    ctx = _Context(folder, found, hf, model, expected, {}, key_map, manifest, model_given=not recorded)
    report.extend(manifest_problems(ctx, reference_given=opts.reference is not None))
    report.extend(config_reading_problems(ctx))
    report.extend(
        native_config_problems(native.model_config, hf.config, native_name=layout, hf_name=f"{hf.source}/config.json")
    )
    if opts.reference is not None:
        report.extend(_use_reference_file(ctx, opts.reference, reference or {}))
    unused = [f"--{n.replace('_', '-')}" for n in ("train_config", "tokenizer") if getattr(opts, n)]
    if unused:
        report.notes.append(f"{', '.join(unused)} not used: a torchtitan model is built from its own config")
    if digests is not None:
        files_pass(folder, digests, report, on_stage)
    if opts.values:
        report.extend(_native_values(ctx, native, opts, report, on_stage))
        report.checked.append("values")
    if opts.loss:
        _native_loss(ctx, native, opts, report, on_stage)
        report.checked.append("loss")
    report.problems.sort(key=lambda p: p.severity != "error")
    return report


def _native_values(
    ctx: _Context, native: Any, opts: DiagnoseOptions, report: Report, on_stage: Callable[[str], None]
) -> list:
    """Against the fingerprints recorded at conversion (no ``--model``), else the HF source through the adapter."""
    from flame_ext.checks.checkpoint_values import Source, Tolerance, compare_with_sources
    from flame_ext.convert.native import plan_native

    tolerance = Tolerance(opts.atol, opts.rtol)
    verified = values_against_record(ctx, opts, tolerance, report, on_stage, space=", in torchtitan's key space")
    if verified is not None:
        return verified
    on_stage(f"comparing values with the HF source mapped by {type(native.adapter).__name__}")
    plan = plan_native(ctx.hf, native, dtype="auto")
    mapped = f"the HF source mapped by {type(native.adapter).__name__}"
    sources: dict[str, Source | None] = {
        e.key: Source(e.spec, e.read_rows, name=mapped) for e in plan.entries if e.key in ctx.key_map
    }
    problems, stats = compare_with_sources(
        ctx.folder, ctx.found, sources, ctx.key_map, buffer_bytes=opts.buffer_bytes, tolerance=tolerance
    )
    report.notes.append(
        f"values: {stats.compared} tensors compared with {mapped}, a layer at a time "
        f"({stats.bytes_read / 1e6:,.1f} MB read)" + (f", {len(stats.skipped)} skipped" if stats.skipped else "")
    )
    return problems


def _native_loss(
    ctx: _Context, native: Any, opts: DiagnoseOptions, report: Report, on_stage: Callable[[str], None]
) -> None:
    from flame_ext.checks.loss import reference_for
    from flame_ext.errors import ForwardUnavailableError
    from flame_ext.titan.native_loss import check_native_loss

    source = ctx.reference or (ctx.manifest if ctx.manifest_usable else None)
    try:
        ref, origin = reference_for(
            ctx.hf, source, dtype="float32", tokenizer=opts.tokenizer, trust_remote_code=opts.trust_remote_code
        )
    except ForwardUnavailableError as exc:
        report.notes.append(f"loss not measured: {exc}")
        return
    on_stage(f"running torchtitan's {native.name} model on the reference batch (CPU)")
    result = check_native_loss(
        native.model_config,
        ctx.folder,
        ctx.found,
        ctx.key_map,
        ref,
        origin,
        module=native.module,
        threshold=opts.threshold,
        token_threshold=token_threshold(opts),
        value_problems=any(p.kind in ("value_mismatch", "nonfinite") for p in report.problems),
    )
    report.loss = result.comparison
    report.extend(result.problems)
    report.notes.extend(result.notes)
