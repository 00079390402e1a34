"""The passes ``flame-ext diagnose`` shares between an HF-named checkpoint and a torchtitan-native one: what a
diagnosis knows about its inputs (``_Context``), the metadata and manifest passes, the config, tokenizer and files
passes, and the values against the record the conversion wrote. ``commands.diagnose`` runs them for HF names,
``commands.diagnose_native`` for torchtitan's own; both import from here, so neither imports the other's back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flame_ext.checks.files import file_problems
from flame_ext.checks.keys import compare_specs, model_part
from flame_ext.checks.recorded import NESTED_PREFIX, RecordedChoices
from flame_ext.command_options import DiagnoseOptions
from flame_ext.errors import InputError
from flame_ext.guard.options import GuardConfig
from flame_ext.io.dcp import model_prefix
from flame_ext.io.hf import HFCheckpoint, build_meta_model, hf_model
from flame_ext.io.key_names import locate_keys
from flame_ext.io.manifest import MANIFEST_NAME, config_hash, manifest_present, read_manifest
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem, Report

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


def token_threshold(opts: DiagnoseOptions) -> float:
    """``--token-threshold``, or the training guard's default: diagnose judges per-token agreement as the guard
    does, and the default is declared once, in ``GuardConfig``."""
    if opts.token_threshold is not None:
        return opts.token_threshold
    return GuardConfig.initial_load_max_token_delta
