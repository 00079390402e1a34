"""``diagnose --files``: the checkpoint folder byte for byte against the SHA-256 recorded at conversion.

The fingerprints (``fingerprints.compare``) find any accidental change to a tensor, but they are sums: whoever
can write the checkpoint can solve for values that keep them (docs/fingerprints.md, "What the fingerprints
prove"). A SHA-256 of every file, recorded by ``convert --record-sha256``, cannot be matched that way; the
price is reading every byte and recording at conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flame_ext.errors import InputError
from flame_ext.io.digests import compare_files, recorded_files
from flame_ext.io.manifest import MANIFEST_NAME
from flame_ext.report import Problem

__all__ = ["recorded_digests", "file_problems"]

_HINT = (
    "the checkpoint was changed after conversion, by a tool or by hand (or the manifest belongs to another "
    "checkpoint): re-convert with `flame-ext convert --record-sha256`, or find what wrote to this folder"
)


def recorded_digests(folder: Path, manifest: dict[str, Any] | None) -> dict[str, str]:
    """The file digests to check against; an error naming the fix when the checkpoint has none."""
    where = folder / MANIFEST_NAME
    digests = recorded_files(manifest)
    if digests is None:
        why = f"{folder} has no {MANIFEST_NAME}" if manifest is None else f"{where} records no file digests"
        raise InputError(
            f"--files: {why}: it was converted without --record-sha256, so there is nothing to check "
            "its files against; re-convert with `flame-ext convert --record-sha256` (--values checks its tensors "
            "against the fingerprints)"
        )
    return digests


def file_problems(folder: Path, digests: dict[str, str]) -> tuple[list[Problem], str]:
    """One ``manifest`` error per file that differs from its digest, is missing, or was not recorded; and a note."""
    differences = compare_files(folder, digests, ignore=(MANIFEST_NAME,))
    problems = [
        Problem("manifest", "error", d.name, f"{d.what}: not the file written at conversion", _HINT)
        for d in differences
    ]
    note = f"files: {len(digests)} recorded files checked byte for byte (sha256), {len(differences)} differ"
    return problems, note
