"""``flame-ext diagnose``: every way a converted checkpoint can differ from its HF source, found at once.

Key lists and parameter counts cannot see what breaks continued pre-training in practice (right-shaped
wrong tensors, silent casts, buffers no checkpoint holds, a training config that is not the model's), so
the diagnosis runs in passes of rising cost, each adding what the cheaper ones cannot see:

1. metadata (always; no tensor data): keys, shapes, dtypes, key layout, training-checkpoint entries,
   the manifest, the data files' sizes; plus the training config and the tokenizer when given;
   ``--files``: every file byte for byte against the SHA-256 recorded by ``convert --record-sha256``;
2. ``--values``: every tensor against its HF source, streamed;
3. ``--loss``: the checkpoint loaded as trainers load it, its loss on the reference batch against the HF
   model's, and the buffers the trainer's own load path leaves wrong.

Problems come back as a ``Report`` (text or the JSON contract); exit 0 when no problem is an error, 1
otherwise, 2 for unreadable input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame_ext.checks.files import recorded_digests
from flame_ext.checks.recorded import recorded_choices
from flame_ext.command_options import DiagnoseOptions
from flame_ext.commands.diagnose_passes import (
    TRAINING_STATE_NAMES,
    _build_expected,
    _Context,
    _dominant_dtype,
    _read_manifest_if_any,
    _use_reference_file,
    config_problems,
    config_reading_problems,
    files_pass,
    manifest_problems,
    metadata_pass,
    recorded_source,
    token_threshold,
    tokenizer_check,
    values_against_record,
)
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.hf import build_meta_model, expected_tensors, open_hf, tied_aliases
from flame_ext.io.manifest import MANIFEST_NAME, TRAINING_STEP, read_manifest
from flame_ext.io.specs import TensorSpec
from flame_ext.process import resume_collector
from flame_ext.report import Problem, Report

__all__ = ["DiagnoseOptions", "diagnose", "run", "TRAINING_STATE_NAMES", "metadata_pass"]


def diagnose(opts: DiagnoseOptions, on_stage: Callable[[str], None] = lambda s: None) -> Report:
    """Run every pass asked for; returns the report. Raises ``FlameExtError`` for unreadable input.

    Without ``opts.model`` the source recorded in the checkpoint's manifest is used (and ``opts.model`` set
    to it, with a note saying so).
    """
    folder = Path(opts.checkpoint)
    found = read_dcp_metadata(folder)  # validated: every byte range it promises exists (io.dcp_metadata)
    manifest = _read_manifest_if_any(folder)
    reference = read_manifest(opts.reference) if opts.reference is not None else None  # refused before any work
    digests = recorded_digests(folder, manifest) if opts.files else None  # refused before any other work
    if manifest is not None and manifest.get("kind") == TRAINING_STEP:
        resume_collector()  # its passes read tensor data
        return _training_step(opts, found, manifest, on_stage)
    if manifest is not None and manifest.get("native"):  # torchtitan's own key names (convert --layout torchtitan:*)
        from flame_ext.commands.diagnose_native import diagnose_native

        resume_collector()  # its passes read tensor data
        return diagnose_native(opts, found, manifest, reference, digests, on_stage)
    recorded = opts.model is None
    if recorded:
        opts.model = recorded_source(folder, manifest)
    hf = open_hf(opts.model)
    on_stage("building the model on meta")
    model = _build_expected(hf, manifest, opts.trust_remote_code)
    expected, tied = expected_tensors(model), tied_aliases(model)
    report, key_map = metadata_pass(found, expected, tied, recorded_choices(manifest))
    report.checked = ["metadata", "manifest", "tokenizer"] + ["config"] * bool(opts.train_config)
    if recorded:
        report.notes.insert(0, f"model: {opts.model}, the source recorded in {MANIFEST_NAME} (--model not given)")
    ctx = _Context(folder, found, hf, model, expected, tied, key_map, manifest, model_given=not recorded)
    report.extend(manifest_problems(ctx, reference_given=opts.reference is not None))
    report.extend(config_reading_problems(ctx))
    if opts.reference is not None and reference is not None:  # read together, above
        report.extend(_use_reference_file(ctx, opts.reference, reference))
    if opts.train_config:
        report.extend(config_problems(ctx, opts.train_config))
    tok_problems, tok_note = tokenizer_check(ctx, opts.tokenizer, opts.trust_remote_code)
    report.extend(tok_problems)
    report.notes.extend([tok_note] if tok_note else [])
    resume_collector()  # start-up and metadata are done: the passes below read tensor data
    if digests is not None:
        files_pass(folder, digests, report, on_stage)
    if opts.values:
        report.extend(_values_pass(ctx, opts, report, on_stage))
        report.checked.append("values")
    if opts.loss:
        _loss_pass(ctx, opts, report, on_stage)
        report.checked.append("loss")
    # Errors first; within a severity, the order of the passes (cheapest evidence first).
    report.problems.sort(key=lambda p: p.severity != "error")
    return report


def _training_step(
    opts: DiagnoseOptions, found: dict[str, TensorSpec | None], record: dict[str, Any], on_stage: Callable[[str], None]
) -> Report:
    """A training checkpoint (``step-N`` of a guarded run) against its save-time record: the keys, and with
    ``--values`` every tensor (model and optimizer state). No HF model and no trainer are needed."""
    from flame_ext.checks.saved_state import step_folder_key_problems, verify_step_folder

    report = Report(checked=["keys", "manifest"])
    report.notes.append(
        f"a training checkpoint: step {record['step']}, saved on {record.get('world_size', '?')} rank(s); checked "
        f"against the save-time record in its {MANIFEST_NAME}, not against an HF model"
    )
    unused = [f"--{n.replace('_', '-')}" for n in ("model", "loss", "train_config", "tokenizer") if getattr(opts, n)]
    if unused:
        report.notes.append(f"{', '.join(unused)} not used: they check a converted checkpoint against its HF model")
    report.extend(step_folder_key_problems(found, record))
    if opts.values:
        on_stage("verifying values against the save-time record")
        problems, line = verify_step_folder(opts.checkpoint, found, record, buffer_bytes=opts.buffer_bytes)
        report.extend(problems)
        report.notes.append(line)
        report.checked.append("values")
    else:
        report.notes.append("values not checked (add --values)")
    report.problems.sort(key=lambda p: p.severity != "error")
    return report


def _values_pass(
    ctx: _Context, opts: DiagnoseOptions, report: Report, on_stage: Callable[[str], None]
) -> list[Problem]:
    """Against the HF source when one is named (``--model``), else against the manifest's fingerprints
    (exact; the HF files are not read). ``--atol/--rtol`` set a deliberate elementwise tolerance (HF source).
    """
    from flame_ext.checks.checkpoint_values import Tolerance, compare_values

    tolerance = Tolerance(opts.atol, opts.rtol)
    verified = values_against_record(ctx, opts, tolerance, report, on_stage)
    if verified is not None:
        return verified
    on_stage("comparing values with the HF source")
    base_prefix = getattr(ctx.model, "base_model_prefix", "model") + "."
    problems, stats = compare_values(
        ctx.folder,
        ctx.found,
        ctx.hf,
        ctx.key_map,
        tied=ctx.tied,
        base_prefix=base_prefix,
        buffer_bytes=opts.buffer_bytes,
        tolerance=tolerance,
    )
    within = f" within atol {opts.atol:g} + rtol {opts.rtol:g}" if tolerance.given else ""
    report.notes.append(
        f"values: {stats.compared} tensors compared with the HF source{within} ({stats.bytes_read / 1e6:,.1f} MB read)"
        + (f", {len(stats.skipped)} skipped" if stats.skipped else "")
    )
    return problems


def _loss_pass(ctx: _Context, opts: DiagnoseOptions, report: Report, on_stage: Callable[[str], None]) -> None:
    from flame_ext.checks.loss import check_loss
    from flame_ext.checks.nonpersistent_buffers import load_path_hazards

    result = check_loss(
        ctx.hf,
        ctx.folder,
        ctx.found,
        ctx.key_map,
        ctx.reference or (ctx.manifest if ctx.manifest_usable else None),
        reference_name=f"--reference {opts.reference}" if ctx.reference else str(ctx.folder / MANIFEST_NAME),
        threshold=opts.threshold,
        token_threshold=token_threshold(opts),
        dtype=_dominant_dtype(ctx.found),
        tokenizer=opts.tokenizer,
        trust_remote_code=opts.trust_remote_code,
        value_problems=any(p.kind in ("value_mismatch", "nonfinite") for p in report.problems),
        on_stage=on_stage,
    )
    report.loss = result.comparison
    report.extend(result.problems)
    report.notes.extend(result.notes)
    on_stage("checking the trainer's load path for non-persistent buffers")
    report.extend(load_path_hazards(lambda: build_meta_model(ctx.hf, trust_remote_code=opts.trust_remote_code)))


# ---------------------------------------------------------------- command line


def _header(opts: DiagnoseOptions, hf_source: str) -> str:
    asked = {"files": opts.files, "values": opts.values, "loss": opts.loss, "config": bool(opts.train_config)}
    passes = ["metadata"] + [name for name, on in asked.items() if on]
    return f"flame-ext diagnose: {opts.checkpoint} against {hf_source} ({', '.join(passes)})"


def run(opts: DiagnoseOptions) -> int:
    """The ``diagnose`` subcommand: print the report (text or JSON), draw the loss when ``--plot`` names a PNG;
    0 when no error, 1 otherwise."""
    as_json, plot = opts.json, opts.plot
    if plot:
        from flame_ext.io.plot import check_plot_destination

        check_plot_destination(plot, option="--plot")  # before the model runs
    stage = (
        (lambda s: print(f"... {s}", file=sys.stderr, flush=True))
        if sys.stderr.isatty() and not as_json
        else (lambda s: None)
    )
    report = diagnose(opts, on_stage=stage)
    if plot:
        _draw(report, plot, opts)
    if as_json:
        print(report.to_json())
    else:
        print(_header(opts, opts.model or "its save-time record"))
        print(report.render_text(group_hints=True))
    return 0 if report.ok else 1


def _draw(report: Report, plot: str, opts: DiagnoseOptions) -> None:
    from flame_ext.io.plot import plot_loss

    if report.loss is None or report.loss.curve is None:
        report.notes.append(f"--plot {plot}: not drawn, the loss was not measured (see the notes above)")
        return
    plot_loss(report.loss, plot, title=f"{opts.checkpoint} against {opts.model}")
    report.notes.append(f"per-position loss drawn in {plot}")
