"""SHA-256 of checkpoint files and of tensor blocks: what proves bytes equal, where sums cannot.

Two uses, one algorithm:

* ``convert --record-sha256`` records the digest of every file it wrote in the manifest's ``files``
  section, and ``diagnose --files`` reads the folder back and compares it byte for byte. The fingerprints
  are linear sums, found by any accidental change but forgeable by someone who can write the checkpoint
  (docs/fingerprints.md, "What the fingerprints prove"); a SHA-256 is not.
* under torchrun, every block a rank converted is digested, and rank 0 digests the same blocks from its
  own source files (``convert.distributed``): the ranks prove they converted the same bytes.

The files are read back after they are written (not hashed inside torch's writer): the digest is then of
what the filesystem holds, the writer is left as torch wrote it, and the bytes just written are still in
the page cache, so the cost is the hash's CPU time (docs/fingerprints.md gives the measurement).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "ALGORITHM",
    "FILES_SECTION",
    "file_sha256",
    "digest_files",
    "written_files",
    "block_sha256",
    "files_section",
    "recorded_files",
    "FileDifference",
    "compare_files",
]

ALGORITHM = "sha256"
FILES_SECTION = "files"  # the manifest's top-level section: {"algorithm": "sha256", "files": {name: hex}}
_CHUNK = 8 << 20  # bytes read at a time: large enough that hashlib (which releases the GIL) dominates


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 8 MiB pieces (64 lowercase hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def digest_files(folder: Path, names: Iterable[str], threads: int = 2) -> dict[str, str]:
    """name -> SHA-256 of ``folder / name``, two files hashed at once (hashlib lets go of the GIL)."""
    names = sorted(names)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return dict(zip(names, pool.map(lambda n: file_sha256(folder / n), names)))


def written_files(folder: Path, manifest_name: str) -> list[str]:
    """The files a writer left in ``folder``: every entry but the manifest (which is written after them)."""
    return sorted(e.name for e in os.scandir(folder) if e.name != manifest_name)


def block_sha256(block: torch.Tensor) -> str:
    """The SHA-256 of a tensor block's bytes as stored (row-major; a non-contiguous block is copied first)."""
    data = block.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().data).hexdigest() if data.numel() else hashlib.sha256().hexdigest()


def files_section(digests: dict[str, str]) -> dict[str, Any]:
    """The manifest's ``files`` section for ``digests`` (relative file name -> SHA-256 hex)."""
    return {"algorithm": ALGORITHM, "files": dict(sorted(digests.items()))}


def recorded_files(manifest: dict[str, Any] | None) -> dict[str, str] | None:
    """The manifest's file digests (name -> sha256 hex), None when it has none. The manifest was read with
    ``read_manifest``, whose schema already checked the section: plain names, 64 lowercase hex digits."""
    section = (manifest or {}).get(FILES_SECTION)
    return None if section is None else dict(section["files"])


class FileDifference(NamedTuple):
    """One file that differs from the record, is missing, or is not in it."""

    name: str
    what: str


def compare_files(folder: Path, recorded: dict[str, str], ignore: Iterable[str] = ()) -> list[FileDifference]:
    """Every file of ``folder`` (other than ``ignore``) against its recorded SHA-256, sorted by name."""
    ignored = set(ignore)
    present = {e.name: e for e in os.scandir(folder) if e.name not in ignored}
    out = []
    for name in sorted(set(present) | set(recorded)):
        entry = present.get(name)
        if entry is None:
            out.append(FileDifference(name, "missing"))
        elif name not in recorded:
            out.append(FileDifference(name, "added since"))
        elif not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            out.append(FileDifference(name, "not a regular file"))
        elif (digest := file_sha256(Path(entry.path))) != recorded[name]:
            was = recorded[name]
            out.append(FileDifference(name, f"its bytes differ (sha256 {digest[:12]}..., recorded {was[:12]}...)"))
    return out
