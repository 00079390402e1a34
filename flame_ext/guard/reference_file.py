"""What the guard checks a load against: the manifest's reference batch and loss, its fingerprints, and the
source config it records. A missing or unusable reference is a ``manifest`` problem reported beside the
key/shape check's, not instead of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from flame_ext.checks.recorded import RecordedChoices, recorded_choices
from flame_ext.errors import FlameExtError
from flame_ext.guard.options import GuardConfig
from flame_ext.report import Problem

if TYPE_CHECKING:
    from flame_ext.fingerprints.record import Fingerprints

__all__ = ["REFERENCE_HINT", "GuardReference", "manifest_problem", "read_guard_reference", "source_config_problems"]

REFERENCE_HINT = (
    "write one with `flame-ext reference --model HF --out FILE` and set checkpoint.initial_load_reference = FILE "
    "(`flame-ext convert` writes it into the checkpoint folder as flame_ext.json), or set "
    "checkpoint.validate_initial_load = false"
)


@dataclass
class GuardReference:
    """The reference of one guarded load; empty (with ``problems``) when there is none to use."""

    reference: dict[str, Any] = field(default_factory=dict)  # token ids and per-token HF loss
    fresh: list[str] = field(default_factory=list)  # keys the conversion initialised itself
    fingerprints: Fingerprints | None = None  # when values are verified
    unavailable: str | None = None  # why the conversion recorded no reference loss
    problems: list[Problem] = field(default_factory=list)
    # The layout and dtype the checkpoint's own manifest records as chosen at conversion (checks.recorded).
    choices: RecordedChoices = field(default_factory=RecordedChoices)


def manifest_problem(detail: str) -> Problem:
    return Problem("manifest", "error", None, detail, REFERENCE_HINT)


def _reference_path(config: GuardConfig, checkpoint: str) -> Path:
    """``initial_load_reference``, or by default the manifest the conversion wrote into the checkpoint."""
    from flame_ext.io.manifest import MANIFEST_NAME

    return Path(config.initial_load_reference or Path(checkpoint) / MANIFEST_NAME)


def read_guard_reference(
    config: GuardConfig, checkpoint: str, parts: list[nn.Module], notes: list[str]
) -> GuardReference:
    """The reference to check ``checkpoint``'s load against; what the report should say about it goes to
    ``notes``."""
    from flame_ext.fingerprints.record import read_fingerprints
    from flame_ext.io.manifest import MANIFEST_NAME, manifest_present, read_manifest, read_reference

    own = Path(checkpoint) / MANIFEST_NAME
    path = _reference_path(config, checkpoint)
    if not manifest_present(path):  # a FIFO or a device is there, and refused by read_manifest
        return GuardReference(
            problems=[manifest_problem(f"no reference for the step-0 loss check: {path} does not exist")]
        )
    try:
        own_manifest = read_manifest(own) if manifest_present(own) else None
        fresh = list((own_manifest or {}).get("fresh_keys", []))
        choices = recorded_choices(own_manifest, where=str(own))
        manifest = read_manifest(path)
        fingerprints = _wanted_fingerprints(config, read_fingerprints(manifest), path, notes)
        if manifest.get("reference") is None and manifest.get("reference_unavailable"):
            # The conversion could not run the model (e.g. Triton without a GPU): after loading, the loss
            # gate is skipped if this machine cannot run it either, and the missing reference is an error if
            # it can. Every other check (keys, buffers, values) runs.
            unavailable = str(manifest["reference_unavailable"])
            return GuardReference(fresh=fresh, fingerprints=fingerprints, unavailable=unavailable, choices=choices)
        reference = read_reference(path)
    except FlameExtError as exc:
        return GuardReference(problems=[manifest_problem(str(exc))])
    from flame_ext.checks.loss import reference_fit_problem

    # The schema bounds the batch (a rectangle of ids in [0, 2**31), at most 64 x 8192); the model bounds it here.
    foreign = reference_fit_problem(reference["token_ids"], parts, str(path), REFERENCE_HINT)
    if foreign is not None:
        return GuardReference(problems=[foreign], choices=choices)
    return GuardReference(reference, fresh, fingerprints, choices=choices)


def _wanted_fingerprints(config: GuardConfig, found: tuple[Any, str | None], path: Path, notes: list[str]) -> Any:
    """The recorded fingerprints when values are to be verified; None (with a note) when not."""
    fingerprints, note = found
    wanted = config.initial_load_verify_values
    if wanted is False:
        notes.append("value verification switched off (checkpoint.initial_load_verify_values = false)")
        return None
    if fingerprints is None and wanted:
        raise FlameExtError(f"{path}: checkpoint.initial_load_verify_values = true, but {note}; or unset the option")
    if note:
        notes.append(note)
    return fingerprints


def source_config_problems(
    config: GuardConfig, checkpoint: str, parts: list[nn.Module], notes: list[str]
) -> list[Problem]:
    """The source config as the trainer's model (or the installed transformers) reads it: checks.config."""
    from flame_ext.checks.config import recorded_source_problems
    from flame_ext.io.manifest import manifest_present

    path = _reference_path(config, checkpoint)
    if not manifest_present(path):
        return []  # reported by the reference check
    problems, note = recorded_source_problems(path, getattr(parts[0], "config", None))
    notes.extend([note] if note else [])
    return problems
