"""Where a DCP tensor's bytes sit in its data files, so that rows of it can be mapped instead of read.

torch's ``FileSystemReader`` reads each stored chunk with ``torch.load`` from the file: the bytes are copied into
fresh memory (every new page faulted in and cleared), then copied again into the caller's buffer. ``to-hf``,
which only passes the bytes on to a safetensors file, spent more CPU on those two copies than on writing
(``perf``, 2 GB bf16). Each chunk is a ``torch.save`` record (a zip file, stored uncompressed) inside a data
file; its tensor's bytes are one contiguous range of it. ``torch.load`` onto ``meta`` reads only the record's
small entries and says where that range starts (``_checkpoint_offset``, which torch's own experimental
checkpoint reader relies on the same way), so a chunk's rows can be handed on as a view of the file's pages
(``file_pages``).

Anything this does not recognise with certainty (a chunk split along another dimension, a stream transform, a
record in another byte order, a torch without the offset, a record that does not parse) returns ``None``: the
caller reads through DCP as before, and DCP's reader reports what is wrong with a damaged record.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from flame_ext.io.file_pages import map_file_bytes
from flame_ext.io.specs import TensorSpec

__all__ = ["StoredRows", "stored_rows", "mapped_blocks"]


@dataclass(frozen=True)
class StoredRows:
    """Rows [start, end) of tensor ``key``, stored contiguously in ``file`` from byte ``begin``."""

    key: str
    start: int
    end: int
    file: Path
    begin: int


def stored_rows(folder: Path, metadata: Metadata, key: str) -> list[StoredRows] | None:
    """The chunks of tensor ``key``, in row order, when they are whole rows that tile the tensor and each one's
    bytes could be located; else None (read it through DCP)."""
    md = metadata.state_dict_metadata.get(key)
    if not isinstance(md, TensorStorageMetadata) or len(md.size) == 0 or md.size.numel() == 0:
        return None  # a 0-d or empty tensor: nothing worth mapping
    shape = tuple(md.size)
    chunks = sorted(md.chunks, key=lambda c: c.offsets[0])
    out: list[StoredRows] = []
    row = 0
    for chunk in chunks:
        whole_rows = all(o == 0 for o in chunk.offsets[1:]) and tuple(chunk.sizes[1:]) == shape[1:]
        if not whole_rows or chunk.offsets[0] != row or chunk.sizes[0] == 0:
            return None
        info = metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        file = folder / info.relative_path
        inner = _tensor_offset(file, info.offset, info.length, (*chunk.sizes,), md.properties.dtype)
        if inner is None:
            return None
        out.append(StoredRows(key, row, row + chunk.sizes[0], file, info.offset + inner))
        row += chunk.sizes[0]
    return out if row == shape[0] else None


def mapped_blocks(chunks: list[StoredRows], spec: TensorSpec, buffer_bytes: int) -> Iterator[torch.Tensor]:
    """The tensor as consecutive blocks of at most ``buffer_bytes`` (at least one row), each a view of its data
    file's pages; a block never spans two chunks."""
    dtype = getattr(torch, spec.dtype)
    row_bytes = spec.nbytes // spec.shape[0]
    step = max(1, buffer_bytes // row_bytes)
    for chunk in chunks:
        for start in range(chunk.start, chunk.end, step):
            end = min(start + step, chunk.end)
            where = f"rows {start}-{end} of {chunk.key}"
            begin = chunk.begin + (start - chunk.start) * row_bytes
            yield map_file_bytes(chunk.file, begin, (end - start, *spec.shape[1:]), dtype, where)


def _tensor_offset(file: Path, offset: int, length: int, sizes: tuple[int, ...], dtype: torch.dtype) -> int | None:
    """Where, inside the record at [offset, offset + length) of ``file``, the bytes of its tensor start; None
    unless the record holds one contiguous tensor of ``sizes`` and ``dtype`` in this machine's byte order, wholly
    inside the record."""
    try:
        with open(file, "rb") as f:
            record = _Slice(f.fileno(), offset, length)
            # Checked before the load too: torch 2.13 crashes (SIGSEGV) byte-swapping a record loaded onto meta.
            if _byte_order(record) != sys.byteorder:
                return None
            record.seek(0)
            meta = torch.load(cast(IO[bytes], record), map_location="meta", weights_only=True)  # no tensor data
    except Exception:  # a record torch cannot parse: DCP's own reader will say what is wrong with it
        return None
    if not isinstance(meta, torch.Tensor) or meta.dtype != dtype or tuple(meta.shape) != sizes:
        return None
    start = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    if start is None or not meta.is_contiguous():
        return None
    start += meta.storage_offset() * dtype.itemsize
    return start if 0 <= start and start + meta.numel() * dtype.itemsize <= length else None


def _byte_order(record: _Slice) -> str:
    """The byte order a ``torch.save`` record declares; "little" when it declares none (as ``torch.load`` reads it).

    Read from the entry's local header rather than with ``ZipFile.read``, which checks the entry's CRC-32: the
    converter writes records without one (``dcp_save._unchecked_records``), as torch's reader allows."""
    with zipfile.ZipFile(record) as archive:
        entries = [i for i in archive.infolist() if i.filename.endswith("/byteorder")]
    if not entries:
        return "little"
    entry = entries[0]
    if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > 16:
        return "unknown"
    record.seek(entry.header_offset)
    header = record.read(30)  # the local file header; its name and extra field lengths at bytes 26 and 28
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        return "unknown"
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    record.seek(entry.header_offset + 30 + name_len + extra_len)
    return record.read(entry.file_size).decode(errors="replace")


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable file of their own (read with ``pread``)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._length - self._pos))
        got = os.preadv(self._fd, [memoryview(buffer)[:n]], self._offset + self._pos) if n else 0
        self._pos += got
        return got
