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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flame_ext.checks.files import file_problems, recorded_digests
from flame_ext.checks.keys import compare_specs, model_part
from flame_ext.checks.recorded import NESTED_PREFIX, RecordedChoices, recorded_choices
from flame_ext.command_options import DiagnoseOptions
from flame_ext.errors import InputError
from flame_ext.guard.options import GuardConfig
from flame_ext.io.dcp import model_prefix, read_dcp_metadata
from flame_ext.io.hf import HFCheckpoint, build_meta_model, expected_tensors, hf_model, open_hf, tied_aliases
from flame_ext.io.key_names import locate_keys
from flame_ext.io.manifest import MANIFEST_NAME, TRAINING_STEP, config_hash, manifest_present, read_manifest
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem, Report

__all__ = ["DiagnoseOptions", "diagnose", "run", "TRAINING_STATE_NAMES", "metadata_pass"]

# Top-level state names of a full training checkpoint besides the model (torchtitan's CheckpointManager).
TRAINING_STATE_NAMES = ("optimizer", "lr_scheduler", "dataloader", "train_state")


@dataclass
class _Context:
    """What every pass needs: both sides indexed, and where each expected key sits in the checkpoint."""

    folder: Path
    found: dict[str, TensorSpec | None]
    hf: HFCheckpoint
    model: torch.nn.Module
    expected: dict[str, TensorSpec]
    tied: dict[str, str]
    key_map: dict[str, str]
    manifest: dict[str, Any] | None
    manifest_usable: bool = True
    reference: dict[str, Any] | None = None  # a usable --reference file, preferred over the manifest for --loss
    # The HF source was named with --model (not taken from the manifest): --values then compares with it;
    # otherwise the manifest's fingerprints are the record of what was written, and the HF files are not read.
    model_given: bool = True


# ---------------------------------------------------------------- inputs


def _read_manifest_if_any(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest; None when there is none (anything else there, a FIFO included, is read and
    refused by ``read_manifest``, never taken for "no manifest")."""
    return read_manifest(folder / MANIFEST_NAME) if manifest_present(folder / MANIFEST_NAME) else None


def _build_expected(hf: HFCheckpoint, manifest: dict[str, Any] | None, trust_remote_code: bool) -> torch.nn.Module:
    """The model the trainer builds, on meta; with the manifest's freshly initialised head when it has one."""
    model = build_meta_model(hf, trust_remote_code=trust_remote_code)
    head = (manifest or {}).get("future_predictor")
    if head:
        from flame_ext.model.future_predictor import attach_future_predictor

        attach_future_predictor(model, head)
    return model


# ---------------------------------------------------------------- metadata pass


def _training_entries(found: dict[str, TensorSpec | None]) -> list[str]:
    return [k for k in found if k.split(".", 1)[0] in TRAINING_STATE_NAMES]


def metadata_pass(
    found: dict[str, TensorSpec | None],
    expected: dict[str, TensorSpec],
    tied: dict[str, str],
    choices: RecordedChoices = RecordedChoices(),
) -> tuple[Report, dict[str, str]]:
    """Keys, shapes and dtypes; a full training checkpoint is recognised and its model part compared. What the
    manifest records as chosen (``choices``: a nested layout, a dtype) is a note, not a problem."""
    report = Report()
    model_keys: dict[str, TensorSpec | None] = dict(model_part(found))
    training = _training_entries(found)
    strip = ""
    if training:
        names = sorted({k.split(".", 1)[0] for k in training})
        report.notes.append(
            f"full training checkpoint ({', '.join(names)}: {len(training)} entries besides the model); its model "
            "part is compared"
        )
    nested = model_prefix(model_keys, expected) == NESTED_PREFIX
    if nested and choices.nested:
        report.notes.append(choices.layout_note(len(model_keys)))
    elif nested and training:
        # torchtitan 0.1 saves {"model": ..., "optimizer": ...} unflattened: nested model keys are its layout.
        report.notes.append(
            "model keys sit under 'model.' as torchtitan 0.1 writes full training checkpoints: the layout a resume "
            "expects, not a fault; an initial model-only load needs flat keys (`flame-ext convert` writes them)"
        )
    if nested and (choices.nested or training):
        strip = NESTED_PREFIX
        model_keys = {k.removeprefix(strip): v for k, v in model_keys.items() if k.startswith(strip)}
    parity = compare_specs(expected, model_keys, tied=tied, choices=choices)
    report.extend(parity.problems)
    report.notes.extend(parity.notes)
    report.counts = dict(parity.counts)
    # Keys of ``found`` (the checkpoint as written) for each expected key, for the passes that read tensors.
    key_map = {k: strip + v for k, v in locate_keys(expected, model_keys).items()}
    return report, key_map


def _foreign(m: dict[str, Any], hf: HFCheckpoint, name: str) -> Problem | None:
    """A manifest or reference written for another model than ``hf`` (model_type or config hash differ)."""
    src = m.get("source") or {}
    if src.get("model_type") == hf.model_type and src.get("config_sha256") == config_hash(hf.config):
        return None
    what = (
        f"model_type {src.get('model_type')!r}, this model {hf.model_type!r}"
        if src.get("model_type") != hf.model_type
        else "the config hash differs from this model's config.json"
    )
    return Problem(
        "manifest",
        "error",
        None,
        f"{name} was written for another model ({src.get('model', '?')}: {what})",
        "its reference loss does not apply to this model; diagnose against the model it names, or re-convert "
        "(if only config.json bookkeeping changed, re-record the reference with `flame-ext reference`)",
    )


def manifest_problems(ctx: _Context, *, reference_given: bool = False) -> list[Problem]:
    """The manifest's problems: absent (a warning, unless a reference file is given), for another model (an
    error), stale against ``.metadata`` (an error)."""
    m = ctx.manifest
    if m is None:
        if reference_given:
            return []
        return [
            Problem(
                "manifest",
                "warning",
                None,
                f"no {MANIFEST_NAME} in {ctx.folder}: nothing records what it was made from or the HF reference loss",
                "convert with `flame-ext convert` (it writes one), or record the reference with "
                "`flame-ext reference --model HF --out FILE` (pass it here with --reference, and to the training "
                "guard)",
            )
        ]
    problems = []
    foreign = _foreign(m, ctx.hf, MANIFEST_NAME)
    if foreign is not None:
        ctx.manifest_usable = False
        problems.append(foreign)
    if m.get("kind", "checkpoint") == "checkpoint" and isinstance(m.get("tensors"), dict):
        problems.extend(_stale(m["tensors"], model_part(ctx.found)))
    return problems


def _use_reference_file(ctx: _Context, path: str, data: dict[str, Any]) -> list[Problem]:
    """``--reference FILE`` (read): used for --loss when it was recorded for this model; an error when it was not."""
    foreign = _foreign(data, ctx.hf, f"--reference {path}")
    if foreign is None and data.get("reference") is not None:
        ctx.reference = data
    return [foreign] if foreign else []


def _stale(table: dict[str, Any], found: dict[str, TensorSpec]) -> list[Problem]:
    recorded = {
        k: TensorSpec(tuple(v.get("shape", ())), str(v.get("dtype"))) for k, v in table.items() if isinstance(v, dict)
    }
    added = sorted(set(found) - set(recorded))
    removed = sorted(set(recorded) - set(found))
    changed = sorted(k for k in set(found) & set(recorded) if found[k] != recorded[k])
    if not (added or removed or changed):
        return []
    parts = [
        f"{n} {what} (e.g. {keys[0]})"
        for what, keys in (
            ("not in the manifest", added),
            ("missing from .metadata", removed),
            ("with another shape or dtype", changed),
        )
        for n in [len(keys)]
        if n
    ]
    return [
        Problem(
            "manifest",
            "error",
            None,
            f"{MANIFEST_NAME} is stale: its tensor table differs from .metadata: " + "; ".join(parts),
            "the checkpoint was changed after conversion (or the manifest copied from another one); re-convert, or "
            "do not trust its reference",
        )
    ]


# ---------------------------------------------------------------- config and tokenizer


def config_problems(ctx: _Context, train_config: str) -> list[Problem]:
    from flame_ext.checks.config import compare_configs, installed_reading_problems, read_config_file

    data, file = read_config_file(train_config)
    problems = compare_configs(data, ctx.hf.config, train_name=str(file), hf_name=ctx.hf.source)
    return problems + installed_reading_problems(data, what=f"--train-config {file}")


def config_reading_problems(ctx: _Context) -> list[Problem]:
    """The HF model's config.json as the installed transformers reads it (metadata pass: no tensor read)."""
    from flame_ext.checks.config import installed_reading_problems

    return installed_reading_problems(ctx.hf.config, what=f"{ctx.hf.source}/config.json")


def tokenizer_check(ctx: _Context, tokenizer: str | None, trust_remote_code: bool) -> tuple[list[Problem], str | None]:
    from flame_ext.checks.tokenizer import has_tokenizer, tokenizer_problems

    if tokenizer is None and not has_tokenizer(ctx.hf.path):
        return [], f"no tokenizer in {ctx.hf.source}: tokenizer not checked (pass --tokenizer to check the trainer's)"
    from flame_ext.model.reference_loss import load_tokenizer

    path = tokenizer or str(ctx.hf.path)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    rows = hf_model(ctx.model).get_input_embeddings().get_parameter("weight").shape[0]
    problems = tokenizer_problems(
        tok, name=path, embedding_rows=rows, config=ctx.hf.config, source_own=tokenizer is None
    )
    return problems, None


# ---------------------------------------------------------------- the whole diagnosis


def _dominant_dtype(found: dict[str, TensorSpec | None]) -> str:
    floats = [s.dtype for s in model_part(found).values() if getattr(torch, s.dtype).is_floating_point]
    return max(set(floats), key=floats.count) if floats else "float32"


def recorded_source(folder: Path, manifest: dict[str, Any] | None) -> str:
    """The HF model a manifest says the checkpoint was made from (local path if it still exists, else its id),
    for ``diagnose`` without ``--model``; an error when nothing records it."""
    src = (manifest or {}).get("source") or {}
    path, model = src.get("path"), src.get("model")
    if manifest is None or not (isinstance(path, str) or isinstance(model, str)):
        where = f"no {MANIFEST_NAME}" if manifest is None else f"its {MANIFEST_NAME} records no source model"
        raise InputError(
            f"--model: not given, and {folder} has {where}; pass --model HF_FOLDER_OR_ID (the model it was made from)"
        )
    if isinstance(path, str) and (Path(path).is_dir() or not isinstance(model, str)):
        return path
    assert isinstance(model, str)  # one of the two is, checked above
    return model


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
        return _training_step(opts, found, manifest, on_stage)
    if manifest is not None and manifest.get("native"):  # torchtitan's own key names (convert --layout torchtitan:*)
        from flame_ext.commands.diagnose_native import diagnose_native

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


def files_pass(folder: Path, digests: Any, report: Report, on_stage: Callable[[str], None]) -> None:
    """Every file of the checkpoint against the SHA-256 recorded at conversion (``--files``)."""
    on_stage("checking every file against its recorded sha256")
    problems, note = file_problems(folder, digests)
    report.extend(problems)
    report.notes.append(note)
    report.checked.append("files")


def values_against_record(
    ctx: _Context,
    opts: DiagnoseOptions,
    tolerance: Any,
    report: Report,
    on_stage: Callable[[str], None],
    space: str = "",
) -> list[Problem] | None:
    """The values against the fingerprints the conversion recorded, when that is what was asked (no ``--model``, no
    tolerance) and the manifest has them; None when the source is to be read instead. ``space`` says in whose
    key space (a native checkpoint's)."""
    from flame_ext.checks.checkpoint_values import verify_fingerprints
    from flame_ext.fingerprints.record import read_fingerprints

    recorded, note = read_fingerprints(ctx.manifest) if ctx.manifest and ctx.manifest_usable else (None, None)
    if recorded is not None and not ctx.model_given and not tolerance.given:
        on_stage("verifying values against the manifest's fingerprints")
        problems, stats = verify_fingerprints(ctx.folder, ctx.found, recorded, buffer_bytes=opts.buffer_bytes)
        report.notes.append(
            f"values: {stats.compared} of {stats.total} tensors verified against the fingerprints recorded at "
            f"conversion{space} ({stats.bytes_read / 1e6:,.1f} MB read, HF source not read)"
        )
        return problems
    if note and ctx.manifest:
        report.notes.append(note)
    return None


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


def token_threshold(opts: DiagnoseOptions) -> float:
    """``--token-threshold``, or the training guard's default: diagnose judges per-token agreement as the guard
    does, and the default is declared once, in ``GuardConfig``."""
    if opts.token_threshold is not None:
        return opts.token_threshold
    return GuardConfig.initial_load_max_token_delta
