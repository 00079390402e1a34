"""``flame_ext.json``: what a converted checkpoint was made from, what it holds, and how the HF model scored.

The manifest is data only: it is read with ``json`` and checked field by field, never evaluated. Paths in
it are informational, with one exception the user asks for: ``diagnose`` without ``--model`` opens the
source model the manifest records (its folder, or its hub id), and its report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from flame_ext.errors import CheckpointFormatError, InputError
from flame_ext.io.fingerprint import ALGORITHM, TERMS, TOLERANCE, as_record
from flame_ext.io.hf_config import read_json_object

__all__ = [
    "MANIFEST_NAME",
    "TRAINING_STEP",
    "FORMAT_VERSION",
    "FINGERPRINTS_VERSION",
    "write_manifest",
    "read_manifest",
    "read_reference",
    "check_reference",
    "config_hash",
    "fingerprints_section",
    "Fingerprints",
    "read_fingerprints",
]

MANIFEST_NAME = "flame_ext.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "tool_version", "source", "tensors", "total_parameters", "fresh_keys", "reference")
# A training step's record (``kind: training_step``): what the validating checkpoint manager saved at that step.
TRAINING_STEP = "training_step"
_STEP_REQUIRED = ("format_version", "kind", "step", "fingerprints")
_REFERENCE_REQUIRED = ("token_ids", "loss_mean", "loss_per_token", "dtype", "attn_implementation")
FINGERPRINTS_VERSION = 1


def config_hash(config: dict) -> str:
    """A stable hash of a model config (sorted JSON), so a manifest can tell which model it belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest next to the checkpoint files (write-then-rename, so it is never half written)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False))
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a manifest (a file, or a checkpoint folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise InputError(f"{path}: no such manifest file")
    data = read_json_object(path, what="flame-ext manifest")  # a regular file of bounded size, an object
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: manifest format version {version!r}; this flame-ext reads version {FORMAT_VERSION} "
            "(re-create it with `flame-ext convert` or `flame-ext reference` of this version)"
        )
    # A reference-only manifest (from `flame-ext reference`) has no tensor table.
    kind = data.get("kind", "checkpoint")
    required = (
        _REQUIRED
        if kind == "checkpoint"
        else _STEP_REQUIRED
        if kind == TRAINING_STEP
        else ("format_version", "source", "reference")
    )
    missing = [k for k in required if k not in data]
    if missing:
        raise CheckpointFormatError(f"{path}: not a valid manifest (missing {', '.join(missing)})")
    if "fingerprints" in data:
        _check_fingerprints(path, data["fingerprints"])
    ref = data.get("reference")
    if ref is not None:
        if not isinstance(ref, dict) or any(k not in ref for k in _REFERENCE_REQUIRED):
            raise CheckpointFormatError(
                f"{path}: not a valid manifest (reference lacks {', '.join(_REFERENCE_REQUIRED)})"
            )
        check_reference(ref, path)
    return data


def check_reference(ref: dict[str, Any], path: str | os.PathLike) -> None:
    """The reference record's shapes and types, before anything is built from it: ``token_ids`` a rectangle
    of integer ids >= 0 with at least 2 tokens per row, ``loss_per_token`` finite numbers, one row per row of
    ids and one column per predicted position, ``loss_mean`` a finite number. The vocabulary bound needs the
    model and is checked where the model is. Raises ``CheckpointFormatError`` naming the field."""
    where = f"{path}: reference"

    def bad(field_name: str, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{where}.{field_name} {problem}; re-create it with `flame-ext reference`")

    ids = ref.get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(row, list) for row in ids):
        raise bad("token_ids", "is not a non-empty list of rows (lists of token ids)")
    if len({len(row) for row in ids}) != 1:
        raise bad("token_ids", f"has rows of different lengths ({sorted({len(row) for row in ids})[:4]})")
    if len(ids[0]) < 2:
        raise bad("token_ids", f"has rows of {len(ids[0])} tokens; a loss needs at least 2")
    wrong = [t for row in ids for t in row if not (_is_int(t) and t >= 0)]
    if wrong:
        raise bad("token_ids", f"holds {wrong[0]!r}; token ids are integers >= 0")
    losses = ref.get("loss_per_token")
    shape = (len(ids), len(ids[0]) - 1)
    if (
        not isinstance(losses, list)
        or len(losses) != shape[0]
        or not all(isinstance(row, list) and len(row) == shape[1] for row in losses)
    ):
        raise bad("loss_per_token", f"is not {shape[0]} rows of {shape[1]} losses (one per predicted token)")
    if not all(_is_finite_number(x) for row in losses for x in row):
        raise bad("loss_per_token", "holds a value that is not a finite number")
    if not _is_finite_number(ref.get("loss_mean")):
        raise bad("loss_mean", f"is {ref.get('loss_mean')!r}, not a finite number")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return (isinstance(value, float) or _is_int(value)) and math.isfinite(value)  # type: ignore[arg-type]


def read_reference(path: str | os.PathLike) -> dict[str, Any]:
    """The reference part of a manifest; a clear error when the manifest was written with --no-reference."""
    data = read_manifest(path)
    if data.get("reference") is None:
        why = data.get("reference_note") if isinstance(data.get("reference_note"), str) else None
        raise InputError(
            f"{path}: the manifest has no reference loss ({why or 'converted with --no-reference'}); "
            "write one with `flame-ext reference --model HF --out FILE`"
        )
    return data["reference"]


def fingerprints_section(
    values: dict[str, torch.Tensor],
    dtypes: dict[str, str],
    rounded: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """The manifest's ``fingerprints`` section: per key, the fingerprint of the values as stored (``dtype``,
    ``fingerprint``) and, when ``rounded`` has the key, those of the values rounded to each training dtype they
    reach only by rounding (``rounded: {dtype: fingerprint}``; ``io.fingerprint.rounding_dtypes``)."""

    def entry(key: str, fp: torch.Tensor) -> dict[str, Any]:
        item: dict[str, Any] = {"dtype": dtypes[key], "fingerprint": as_record(fp)}
        if (rounded or {}).get(key):
            item["rounded"] = {d: as_record(v) for d, v in sorted(rounded[key].items())}  # type: ignore[index]
        return item

    return {
        "version": FINGERPRINTS_VERSION,
        "algorithm": ALGORITHM,
        "terms": list(TERMS),
        "tolerance": TOLERANCE,
        "tensors": {k: entry(k, v) for k, v in sorted(values.items())},
    }


class Fingerprints(dict):
    """key -> (stored dtype, fingerprint) from a manifest, with the tolerance it was written for, and
    ``rounded``: key -> {dtype: fingerprint of the stored values rounded to it} (empty for manifests written
    before flame-ext recorded them)."""

    tolerance: float = TOLERANCE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounded: dict[str, dict[str, list[float]]] = {}


def read_fingerprints(manifest: dict[str, Any]) -> tuple[Fingerprints | None, str | None]:
    """The fingerprints of a (checked) manifest, or None with a note saying why values cannot be verified."""
    section = manifest.get("fingerprints")
    if section is None:
        return None, (
            "the manifest has no fingerprints (written before flame-ext recorded them): values are not verified "
            "exactly; re-convert, or write them with `flame-ext reference --model HF --out FILE`"
        )
    if section.get("version") != FINGERPRINTS_VERSION or section.get("algorithm") != ALGORITHM:
        return None, (
            f"the manifest's fingerprints are version {section.get('version')!r} ({section.get('algorithm')!r}); this "
            f"flame-ext reads version {FINGERPRINTS_VERSION} ({ALGORITHM}): values are not verified exactly"
        )
    out = Fingerprints({k: (v["dtype"], v["fingerprint"]) for k, v in section["tensors"].items()})
    out.tolerance = float(section["tolerance"])
    out.rounded = {k: dict(v["rounded"]) for k, v in section["tensors"].items() if isinstance(v.get("rounded"), dict)}
    return out, None


def _check_fingerprints(path: Path, section: Any) -> None:
    """A fingerprint section of a version this flame-ext reads must be well formed (others are left alone)."""

    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path}: not a valid manifest (fingerprints: {why})")

    if not isinstance(section, dict):
        raise bad("not an object")
    if section.get("version") != FINGERPRINTS_VERSION or section.get("algorithm") != ALGORITHM:
        return  # another version: read_fingerprints says it is not understood
    tol = section.get("tolerance")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1e-6:
        raise bad(f"tolerance {tol!r} is not a number in (0, 1e-6]")
    tensors = section.get("tensors")
    if not isinstance(tensors, dict):
        raise bad("no tensors table")
    for key, item in tensors.items():
        fp = item.get("fingerprint") if isinstance(item, dict) else None
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("dtype"), str)
            and isinstance(getattr(torch, item["dtype"], None), torch.dtype)
            and isinstance(fp, list)
            and len(fp) == len(TERMS)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in fp)
        )
        if not ok:
            raise bad(f"the entry for {key!r} is not a dtype and {len(TERMS)} finite numbers")
