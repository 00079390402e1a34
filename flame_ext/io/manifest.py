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
from typing import TYPE_CHECKING, Any

from flame_ext.errors import CheckpointFormatError, InputError, short_value
from flame_ext.io.hf_config import read_json_object
from flame_ext.io.manifest_schema import NonFinite, check_manifest

if TYPE_CHECKING:
    from flame_ext.io.hf import HFCheckpoint

__all__ = [
    "MANIFEST_NAME",
    "TRAINING_STEP",
    "FORMAT_VERSION",
    "write_manifest",
    "read_manifest",
    "read_reference",
    "manifest_present",
    "config_hash",
    "build_manifest",
]

MANIFEST_NAME = "flame_ext.json"
FORMAT_VERSION = 1
# A training step's record (``kind: training_step``): what the validating checkpoint manager saved at that step.
TRAINING_STEP = "training_step"


def config_hash(config: dict) -> str:
    """A stable hash of a model config (sorted JSON), so a manifest can tell which model it belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def build_manifest(kind: str, source: HFCheckpoint | None = None, **fields: Any) -> dict[str, Any]:
    """A manifest of ``kind`` (``checkpoint``, ``reference``, ``training_step``): its version, kind and the tool that
    wrote it, the ``source`` block when it was made from an HF model, then ``fields`` in the order given.

    The one place a manifest's head is built, so every kind records its source the same way (a reference file
    names the architectures as a converted checkpoint does).
    """
    from flame_ext import __version__

    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": kind, "tool_version": __version__}
    if source is not None:
        manifest["source"] = {
            "model": source.source,
            "path": str(source.path),
            "revision": source.revision,
            "model_type": source.model_type,
            "architectures": source.config.get("architectures"),
            "config_sha256": config_hash(source.config),
        }
    return {**manifest, **fields}


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
