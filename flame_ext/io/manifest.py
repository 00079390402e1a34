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

from flame_ext.errors import CheckpointFormatError, InputError

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "write_manifest", "read_manifest", "read_reference", "config_hash"]

MANIFEST_NAME = "flame_ext.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "tool_version", "source", "tensors", "total_parameters", "fresh_keys", "reference")
_REFERENCE_REQUIRED = ("token_ids", "loss_mean", "loss_per_token", "dtype", "attn_implementation")


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
    if not path.is_file():
        raise InputError(f"{path}: no such manifest file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{path}: not a valid manifest (not JSON: {exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: not a valid manifest (not a JSON object)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: manifest format version {version!r}; this flame-ext reads version {FORMAT_VERSION} "
            "(re-create it with `flame-ext convert` or `flame-ext reference` of this version)"
        )
    # A reference-only manifest (from `flame-ext reference`) has no tensor table.
    required = (
        _REQUIRED if data.get("kind", "checkpoint") == "checkpoint" else ("format_version", "source", "reference")
    )
    missing = [k for k in required if k not in data]
    if missing:
        raise CheckpointFormatError(f"{path}: not a valid manifest (missing {', '.join(missing)})")
    ref = data.get("reference")
    if ref is not None:
        if not isinstance(ref, dict) or any(k not in ref for k in _REFERENCE_REQUIRED):
            raise CheckpointFormatError(
                f"{path}: not a valid manifest (reference lacks {', '.join(_REFERENCE_REQUIRED)})"
            )
    return data


def read_reference(path: str | os.PathLike) -> dict[str, Any]:
    """The reference part of a manifest; a clear error when the manifest was written with --no-reference."""
    data = read_manifest(path)
    if data.get("reference") is None:
        raise InputError(
            f"{path}: the manifest has no reference loss (converted with --no-reference); "
            "write one with `flame-ext reference --model HF --out FILE`"
        )
    return data["reference"]
