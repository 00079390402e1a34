"""A training checkpoint against its save-time record: one rule for the resume guard and ``diagnose --values``.

The record (``guard.save_record``) holds, per DCP key, the fingerprint of each saved tensor with its kind
(model, optimizer, other state) and the digest of each non-tensor state. The caller computes the observed
side its own way (the guard from the live, loaded state summed over ranks; diagnose by streaming the step
folder's files); this module compares, per kind, with ``fingerprints.compare.fingerprint_problems``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from flame_ext.fingerprints.compare import Verification, fingerprint_problems
from flame_ext.fingerprints.record import read_fingerprints
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

__all__ = [
    "LABELS",
    "HINT",
    "recorded_groups",
    "saved_state_problems",
    "step_folder_key_problems",
    "verify_step_folder",
    "step_record",
    "export_problems",
]

LABELS = {"model": "model", "optimizer": "optimizer state", "state": "other state"}
HINT = (
    "the checkpoint changed after it was saved (a file edited, truncated, overwritten or copied in from another "
    "run), or the load put other values there: do not train on; resume from another step folder "
    "(checkpoint.load_step) or restore this one from a copy"
)


def step_record(folder: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """A step folder's save-time record, or None and why not (absent, another kind of manifest, a version this
    flame-ext does not read). A record that is there but unreadable raises ``CheckpointFormatError``."""
    from flame_ext.io.manifest import MANIFEST_NAME, TRAINING_STEP, read_manifest

    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None, f"{path} is absent: saved without the guard, by another tool, or interrupted before it"
    data = read_manifest(path)
    if data.get("kind") != TRAINING_STEP:
        return None, f"{path} is a {data.get('kind', 'checkpoint')!r} manifest, not a save-time record"
    recorded, why = read_fingerprints(data)
    return (data, None) if recorded is not None else (None, why)


def recorded_groups(record: Mapping[str, Any]) -> dict[str, str]:
    """Each recorded key's kind (``model``, ``optimizer``, ``state``), tensors and digests alike."""
    groups = {k: v.get("group", "state") for k, v in record["fingerprints"]["tensors"].items()}
    groups.update({k: v.get("group", "state") for k, v in record.get("digests", {}).items()})
    return {k: g if g in LABELS else "state" for k, g in groups.items()}


def saved_state_problems(
    record: Mapping[str, Any],
    observed: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    stored_dtypes: Mapping[str, str],
    digests: Mapping[str, str],
    group: Callable[[str], str],
) -> list[Problem]:
    """One ``value_mismatch`` per key whose fingerprint (``observed``, the whole tensor's) or digest (``digests``:
    key -> sha256 of the value found) is not the recorded one, naming its kind."""
    recorded, _ = read_fingerprints(dict(record))
    assert recorded is not None, "only records whose fingerprints this version reads are compared"
    step = record.get("step")
    problems: list[Problem] = []
    for kind, label in LABELS.items():  # per kind, so a finding ("holds the values expected for ...") stays within it
        plan = Verification({k: k for k in sorted(observed) if k in recorded and group(k) == kind}, [])
        problems += fingerprint_problems(
            observed,
            recorded,
            plan,
            shapes,
            stored_dtypes=stored_dtypes,
            written=f"at the save of step {step}",
            where=f" ({label})",
            hint=lambda _code: HINT,
        )
    expected = record.get("digests", {})
    for key in sorted(k for k in digests if k in expected):
        got, want = digests[key], str(expected[key].get("sha256"))
        if got != want:
            problems.append(
                Problem(
                    "value_mismatch",
                    "error",
                    key,
                    f"its value is not the one written at the save of step {step} ({LABELS[group(key)]}): "
                    f"sha256 {got[:12]}... where {want[:12]}... was recorded",
                    HINT,
                )
            )
    return problems


def step_folder_key_problems(found: Mapping[str, TensorSpec | None], record: Mapping[str, Any]) -> list[Problem]:
    """Keys the record holds and the step folder lacks, and tensors stored with another dtype than saved (errors);
    entries without a record (one warning: written by something else than the guarded manager)."""
    tensors = record["fingerprints"]["tensors"]
    recorded = set(tensors) | set(record.get("digests", {}))
    groups = recorded_groups(record)
    problems = [
        Problem(
            "missing_key",
            "error",
            key,
            f"the save of step {record.get('step')} wrote it ({LABELS[groups[key]]}), the folder's .metadata has none",
            HINT,
        )
        for key in sorted(recorded - set(found))
    ]
    stored = {k: s.dtype for k, s in found.items() if s is not None}
    problems += [
        Problem(
            "dtype_mismatch",
            "error",
            key,
            f"stored as {stored[key]}, saved as {tensors[key]['dtype']} ({LABELS[groups[key]]})",
            HINT,
        )
        for key in sorted(k for k in tensors if k in stored and stored[k] != tensors[k]["dtype"])
    ]
    unrecorded = sorted(k for k in found if k not in recorded)
    if unrecorded:
        problems.append(
            Problem(
                "unexpected_key",
                "warning",
                unrecorded[0],
                f"{len(unrecorded)} entries have no save-time record (first: {unrecorded[0]})",
                "written after the save by another tool, or the record comes from another save: their values are not "
                "verified",
            )
        )
    return problems


def verify_step_folder(
    folder: str | Path, found: Mapping[str, TensorSpec | None], record: Mapping[str, Any], *, buffer_bytes: int
) -> tuple[list[Problem], str]:
    """Every recorded tensor of a step folder, streamed from its files, against the record; with the coverage
    line. Non-tensor states are not read: that would unpickle checkpoint data."""
    from flame_ext.checks.checkpoint_values import stored_fingerprints
    from flame_ext.io.dcp import DCPRowReader

    tensors = record["fingerprints"]["tensors"]
    present = {k: s for k, s in found.items() if s is not None}
    keys = sorted(k for k in present if k in tensors)
    reader = DCPRowReader(folder)
    observed = stored_fingerprints(reader, {key: present[key] for key in keys}, buffer_bytes)
    groups = recorded_groups(record)
    problems = saved_state_problems(
        record,
        observed,
        {k: present[k].shape for k in keys},
        stored_dtypes={k: present[k].dtype for k in keys},
        digests={},
        group=lambda k: groups.get(k, "state"),
    )
    others = len([k for k, s in found.items() if s is None])
    line = (
        f"values: {len(keys)} of {len(present)} tensors verified against the save-time record of step "
        f"{record.get('step')}; {others} non-tensor states not read (their digests are checked on resume)"
    )
    return problems, line


def export_problems(
    record: Mapping[str, Any],
    observed: Mapping[str, torch.Tensor],
    found: Mapping[str, TensorSpec | None],
) -> list[Problem]:
    """The tensors an export read (``observed``: checkpoint key -> fingerprint of the values as stored) against
    the record; keys the record does not hold are not judged."""
    tensors = record["fingerprints"]["tensors"]
    keys = [k for k in observed if k in tensors and found.get(k) is not None]
    groups = recorded_groups(record)
    return saved_state_problems(
        record,
        {k: observed[k] for k in keys},
        {k: found[k].shape for k in keys},  # type: ignore[union-attr]
        stored_dtypes={k: found[k].dtype for k in keys},  # type: ignore[union-attr]
        digests={},
        group=lambda k: groups.get(k, "state"),
    )
