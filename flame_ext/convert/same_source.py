"""Under torchrun: proof that every rank converted the bytes rank 0 would have converted.

The ranks' first agreement (``convert.distributed``) compares options, the source's config and its tensor
list: names, shapes and dtypes. Two nodes holding different revisions of a model agree on all of that and
differ in every value. So the ranks also compare content, by the one method that sees every byte converted:

1. Each rank tells rank 0 which files it reads, as (kernel boot id, device, inode, size, mtime) per tensor.
   A rank whose every source tensor sits in the very file rank 0 reads (same kernel, same inode) reads
   rank 0's bytes by construction: nothing more to prove. That is the one-node case, at no cost.
2. Every other rank takes the SHA-256 of each block it converts, as it writes it (the block in hand, no
   second read), and sends the digests to rank 0.
3. Rank 0 converts the same blocks from its own files (the same reader, the same cast) and compares. Any
   difference, in any byte of any block, is found: sampling could miss one, this cannot.
4. Rank 0 shares its verdict; on a difference every rank refuses with one line naming the files on both
   sides, exit 2, and the temporary folder is removed before anything is published.

Cost, only where ranks read different copies (other nodes, or other folders): each such rank hashes its
share once as it writes; rank 0 reads and hashes those shares once more (at most (N-1)/N of the model).
docs/distributed.md gives the measured figures.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flame_ext.io.dcp_save import DEFAULT_THREADS, WriteEntry
from flame_ext.io.digests import block_sha256

__all__ = ["Block", "file_identities", "same_files", "BlockDigests", "differing_keys", "mixed_sources_message"]

# A block: (key, first row, end row or None for a 0-d tensor, SHA-256 hex).
Block = tuple[str, int, "int | None", str]
_MAX_NAMED = 4


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: no proof of a shared kernel, so every rank digests
        return f"unknown-{os.getpid()}"


def file_identities(entries: Iterable[WriteEntry]) -> dict[str, tuple]:
    """Per tensor key: the identity of the file this rank reads it from (None for a freshly made tensor)."""
    boot = _boot_id()
    seen: dict[Path, tuple] = {}
    out: dict[str, tuple] = {}
    for e in entries:
        if e.source is None:
            out[e.key] = ()
            continue
        if e.source not in seen:
            st = os.stat(e.source)
            seen[e.source] = (boot, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        out[e.key] = seen[e.source]
    return out


def same_files(mine: dict[str, tuple], rank0: dict[str, tuple]) -> bool:
    """True when every tensor is read from rank 0's own file (the same inode under the same kernel)."""
    return mine == rank0 and all(ident and not ident[0].startswith("unknown-") for ident in mine.values() if ident)


class BlockDigests:
    """``on_block`` for the writer: the SHA-256 of every block as written (thread-safe: the writer threads call it)."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._lock = threading.Lock()

    def add(self, key: str, start: int, block: torch.Tensor) -> None:
        digest = block_sha256(block)
        with self._lock:
            self.blocks.append((key, start, start + block.shape[0] if block.dim() else None, digest))


def _read_block(entry: WriteEntry, start: int, end: int | None) -> torch.Tensor:
    return entry.read_rows(0, 1) if end is None else entry.read_rows(start, end)


def differing_keys(entries: Sequence[WriteEntry], blocks: Sequence[Block]) -> list[str]:
    """The keys of ``blocks`` whose bytes, converted from this rank's own files, have another SHA-256."""
    by_key = {e.key: e for e in entries}

    def differs(block: Block) -> str | None:
        key, start, end, digest = block
        return key if block_sha256(_read_block(by_key[key], start, end)) != digest else None

    with ThreadPoolExecutor(DEFAULT_THREADS) as pool:  # hashlib lets go of the GIL: both cores hash
        found = {k for k in pool.map(differs, blocks) if k is not None}
    return sorted(found)


def mixed_sources_message(differences: dict[int, list[str]], files: dict[int, dict[str, str]], dest: str) -> str:
    """The refusal, one line: for each rank whose bytes differ, its files and rank 0's (``files``: rank -> key ->
    file path); made on rank 0 and said by every rank."""
    parts = [_rank_part(rank, keys, files) for rank, keys in sorted(differences.items())]
    return (
        "the ranks read different weights under the same names and shapes: "
        + "; ".join(parts)
        + f". Every rank must read the same model files (the same revision); nothing was published at {dest}"
    )


def _rank_part(rank: int, keys: list[str], files: dict[int, dict[str, str]]) -> str:
    """``rank 1's a.safetensors, b.safetensors (in /n1/m) differ from rank 0's (in /n0/m), 12 tensors``, or the
    pairs of paths when the file names are not the same on both sides."""
    pairs = sorted({(files[rank].get(k, "(made here)"), files[0].get(k, "(made here)")) for k in keys})
    theirs, ours = [Path(p[0]) for p in pairs], [Path(p[1]) for p in pairs]
    tensors = f"{len(keys)} tensor{'s' * (len(keys) != 1)}"
    more = f" and {len(pairs) - _MAX_NAMED} more" if len(pairs) > _MAX_NAMED else ""
    if [p.name for p in theirs] == [p.name for p in ours] and len({p.parent for p in theirs + ours}) == 2:
        names = ", ".join(p.name for p in theirs[:_MAX_NAMED]) + more
        return f"rank {rank}'s {names} (in {theirs[0].parent}) differ from rank 0's (in {ours[0].parent}), {tensors}"
    named = "; ".join(f"rank {rank}'s {a} differs from rank 0's {b}" for a, b in pairs[:_MAX_NAMED])
    return f"{named}{more}, {tensors}"
