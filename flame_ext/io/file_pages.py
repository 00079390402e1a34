"""A byte range of a file as a tensor that is a view of the file's pages: no read, no copy.

For passing bytes on to another file: the pages go straight from the page cache into the write, where a read
into a fresh buffer copies every byte once more and faults in and clears every new page (a 4 GB conversion spent
as long allocating blocks as writing them; ``to-hf``, reading DCP data through ``torch.load``, copied each byte
three times). The mapping is private copy-on-write, so a caller that writes to the tensor changes its own copy,
never the file; it covers only the range asked for and lives exactly as long as the tensor.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from flame_ext.errors import CheckpointFormatError

__all__ = ["map_file_bytes"]


def map_file_bytes(file: Path, begin: int, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` whose bytes start at ``begin`` in ``file``; ``what`` (e.g. "tensor
    x") names it when the file ends before it does."""
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
    with open(file, "rb") as f:
        if begin + nbytes > os.fstat(f.fileno()).st_size:
            raise CheckpointFormatError(f"{file}: ends inside {what}; the file changed or is truncated")
        mapping = mmap.mmap(
            f.fileno(),
            begin - aligned + nbytes,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
    # frombuffer keeps ``mapping`` alive, and its storage is exactly these bytes (so torch does not clone it).
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=begin - aligned)
    return flat.view(dtype).view(shape)
