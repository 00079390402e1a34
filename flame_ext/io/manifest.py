"""``flame_ext.json``: what a converted checkpoint was made from, what it holds, and how the HF model scored.

The manifest is data only: it is read with ``json`` and checked field by field, never evaluated. Paths in
it are informational, with one exception the user asks for: ``diagnose`` without ``--model`` opens the
source model the manifest records (its folder, or its hub id), and its report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from flame_ext.errors import CheckpointFormatError, InputError, short_value
from flame_ext.io.fingerprint import ALGORITHM, TERMS, TOLERANCE, as_record
from flame_ext.io.hf_config import read_json_object
from flame_ext.io.manifest_schema import NonFinite, check_manifest

__all__ = [
    "MANIFEST_NAME",
    "TRAINING_STEP",
    "FORMAT_VERSION",
    "FINGERPRINTS_VERSION",
    "write_manifest",
    "read_manifest",
    "read_reference",
    "manifest_present",
    "config_hash",
    "fingerprints_section",
    "Fingerprints",
    "read_fingerprints",
]

MANIFEST_NAME = "flame_ext.json"
FORMAT_VERSION = 1
# A training step's record (``kind: training_step``): what the validating checkpoint manager saved at that step.
TRAINING_STEP = "training_step"
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
    """Read and check a manifest (a file, or a checkpoint folder holding one) against the manifest schema.

    Whatever the file holds, the result is a manifest of this format version whose every field has the type
    and the bounds ``schemas/manifest.schema.json`` declares, or one ``CheckpointFormatError`` naming the file,
    the field and the fix. A FIFO or a device in its place is refused, never read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such manifest file")
    # A regular file of bounded size holding an object; NaN and Infinity become values the schema refuses.
    data = read_json_object(path, what="flame-ext manifest", parse_constant=NonFinite)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: manifest format version {short_value(version)}; this flame-ext reads version {FORMAT_VERSION} "
            "(re-create it with `flame-ext convert` or `flame-ext reference` of this version)"
        )
    check_manifest(data, path)
    return data


def manifest_present(path: Path) -> bool:
    """Whether a manifest is there to be read: anything at ``path`` but nothing at all, so that a FIFO, a
    device or a dangling link is refused by ``read_manifest`` rather than taken for "no manifest"."""
    return os.path.lexists(path)


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
