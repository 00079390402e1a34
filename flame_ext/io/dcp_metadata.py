"""What a DCP ``.metadata`` must hold before a byte of the checkpoint is read: checked as data.

The allow-list unpickler (``io.dcp``) decides which classes may appear; this module decides whether the
values make sense. torch's reader trusts them: chunks that leave part of a tensor uncovered give
uninitialised memory, a storage record naming an absolute path or ``..`` reads outside the checkpoint, one
naming a FIFO blocks forever, and an offset past a file's end fails deep in ``torch.load``. So every tensor's
chunks must tile its global shape exactly (no gap, no overlap), every chunk and byte entry must have a storage
record, and every record must point into a regular file inside the checkpoint folder, within that file.

What metadata cannot show is left to the read: a record that points at another real record of the same size
(there are no checksums in DCP) reads that record.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from flame_ext.errors import CheckpointFormatError
from flame_ext.io.specs import SAFETENSORS_DTYPES

__all__ = ["validate_metadata"]

# Plain numeric dtypes; quantized and bit-packed ones have no itemsize a record's length can be checked against.
_DTYPES = frozenset(SAFETENSORS_DTYPES.values()) | {
    torch.complex64,
    torch.complex128,
    torch.uint16,
    torch.uint32,
    torch.uint64,
}


def validate_metadata(folder: Path, md: Metadata) -> None:
    """Raise ``CheckpointFormatError`` naming the key or file and the problem, or return: ``md`` is sound.

    Costs one ``lstat`` per data file and O(n log n) in the number of chunks; no tensor data is read.
    """
    where = f"{folder}/.metadata"
    entries = md.state_dict_metadata
    if not isinstance(entries, Mapping) or not all(isinstance(k, str) for k in entries):
        raise CheckpointFormatError(f"{where}: state_dict_metadata is a {type(entries).__name__}, not a map of keys")
    records = md.storage_data
    if not isinstance(records, Mapping):
        raise CheckpointFormatError(f"{where}: storage_data is a {type(records).__name__}, not a map of records")
    _check_records(folder, where, records)
    needed: dict[MetadataIndex, int] = {}  # storage index -> bytes of tensor data it must at least hold
    for key, item in entries.items():
        if isinstance(item, TensorStorageMetadata):
            for chunk in _tensor_chunks(where, key, item):
                needed[MetadataIndex(key, chunk.offsets)] = _volume(chunk.sizes) * item.properties.dtype.itemsize
        elif isinstance(item, BytesStorageMetadata):
            needed[MetadataIndex(key)] = 0
        else:
            raise CheckpointFormatError(
                f"{where}: entry {key!r} is a {type(item).__name__}, not tensor or bytes metadata"
            )
    for index, nbytes in needed.items():
        info = records.get(index)
        if info is None:
            raise CheckpointFormatError(
                f"{where}: {index.fqn} (chunk at {list(index.offset or ())}) has no storage record; "
                "the checkpoint is corrupt"
            )
        if not getattr(info, "transform_descriptors", None) and info.length < nbytes:
            raise CheckpointFormatError(
                f"{where}: the record of {index.fqn} holds {info.length} bytes, fewer than the {nbytes} its chunk needs"
            )


def _check_records(folder: Path, where: str, records: Mapping) -> None:
    """Every storage record checked for types and bounds; each file it names lstat-ed once."""
    sizes: dict[str, int] = {}
    for index, info in records.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            raise CheckpointFormatError(f"{where}: a storage record is keyed by a {type(index).__name__}")
        rel, offset, length = (getattr(info, n, None) for n in ("relative_path", "offset", "length"))
        name = f"the record of {index.fqn}"
        if not isinstance(rel, str) or not rel:
            raise CheckpointFormatError(f"{where}: {name} names no file (relative_path {rel!r})")
        for field_name, value in (("offset", offset), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointFormatError(f"{where}: {name} has {field_name} {value!r}; expected an integer >= 0")
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors is not None and not (
            isinstance(descriptors, (list, tuple)) and all(isinstance(d, str) for d in descriptors)
        ):
            raise CheckpointFormatError(f"{where}: {name} has transform_descriptors {descriptors!r}")
        if rel not in sizes:
            sizes[rel] = _file_size(folder, where, rel)
        assert isinstance(offset, int) and isinstance(length, int)  # checked above
        if offset + length > sizes[rel]:
            raise CheckpointFormatError(
                f"{folder / rel}: truncated ({sizes[rel]} bytes, .metadata promises {offset + length} for "
                f"{index.fqn}); copy or write the checkpoint again"
            )


def _file_size(folder: Path, where: str, rel: str) -> int:
    """The size of data file ``rel``, which must be a regular file directly reachable inside ``folder``."""
    parts = PurePosixPath(rel).parts
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or ".." in parts or "\\" in rel or "\0" in rel:
        raise CheckpointFormatError(
            f"{where}: a storage record names {rel!r}, a path outside the checkpoint folder; refused "
            "(DCP writes plain file names inside the folder)"
        )
    path = folder / rel
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise CheckpointFormatError(
            f"{path}: missing ({exc.strerror}); .metadata names it as a data file of the checkpoint (incomplete copy?)"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise CheckpointFormatError(f"{path}: {kind}; a DCP data file must be a regular file inside the checkpoint")
    real_parent = os.path.realpath(path.parent)
    if os.path.commonpath([real_parent, os.path.realpath(folder)]) != os.path.realpath(folder):
        raise CheckpointFormatError(f"{path}: reached through a symlink that leads outside the checkpoint; refused")
    return st.st_size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dims(value: Any, ndim: int | None) -> bool:
    return (
        isinstance(value, tuple) and (ndim is None or len(value) == ndim) and all(_is_int(v) and v >= 0 for v in value)
    )


def _volume(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _tensor_chunks(where: str, key: str, item: TensorStorageMetadata) -> list[ChunkStorageMetadata]:
    """The tensor's chunks, checked: types, bounds, and an exact tiling of its global shape."""
    props = item.properties
    if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
        raise CheckpointFormatError(f"{where}: {key} has no valid dtype ({getattr(props, 'dtype', props)!r})")
    if props.dtype not in _DTYPES:
        raise CheckpointFormatError(f"{where}: {key} has dtype {props.dtype}, which checkpoints of weights never hold")
    size = item.size
    if not _dims(size, None):
        raise CheckpointFormatError(f"{where}: {key} has shape {size!r}; expected non-negative integers")
    chunks = item.chunks
    if not isinstance(chunks, list) or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
        raise CheckpointFormatError(f"{where}: {key} has chunks of type {type(chunks).__name__}; expected a list")
    for c in chunks:
        if not (_dims(c.offsets, len(size)) and _dims(c.sizes, len(size))):
            raise CheckpointFormatError(
                f"{where}: {key} has a chunk at {c.offsets!r} of {c.sizes!r}; expected {len(size)} integers >= 0 each"
            )
        if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, size)):
            raise CheckpointFormatError(
                f"{where}: {key} has a chunk at {list(c.offsets)} of {list(c.sizes)}, outside its shape {list(size)}"
            )
    covered = sum(_volume(c.sizes) for c in chunks)
    total = _volume(size)
    if covered < total:
        raise CheckpointFormatError(
            f"{where}: {key}: its chunks cover {covered} of its {total} elements; the rest would be read as "
            "uninitialised memory, the checkpoint is corrupt or incomplete"
        )
    overlap = _first_overlap([c for c in chunks if _volume(c.sizes) > 0])
    if covered > total or overlap:
        a, b = overlap or (chunks[0], chunks[0])
        raise CheckpointFormatError(
            f"{where}: {key}: chunks overlap (at {list(a.offsets)} and {list(b.offsets)}; {covered} elements stored "
            f"for {total}); the checkpoint is corrupt"
        )
    return chunks


def _first_overlap(chunks: list[ChunkStorageMetadata]) -> tuple[ChunkStorageMetadata, ChunkStorageMetadata] | None:
    """Two chunks sharing an element, if any: a sweep along the first dimension.

    Sorted by start, each chunk is compared only with the earlier chunks still open at its start: one for row
    blocks, the number of column shards for a 2-D sharding, so the sweep is O(n log n) in practice.
    """
    if not chunks or not chunks[0].offsets:
        return (chunks[0], chunks[1]) if len(chunks) > 1 else None
    open_chunks: list[ChunkStorageMetadata] = []
    for c in sorted(chunks, key=lambda c: tuple(c.offsets)):
        start = c.offsets[0]
        open_chunks = [o for o in open_chunks if o.offsets[0] + o.sizes[0] > start]
        for o in open_chunks:
            if all(ob < cb + cs and cb < ob + os_ for ob, os_, cb, cs in zip(o.offsets, o.sizes, c.offsets, c.sizes)):
                return o, c
        open_chunks.append(c)
    return None
