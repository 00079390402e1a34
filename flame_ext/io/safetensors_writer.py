"""Streaming safetensors writer.

A safetensors file is an 8-byte header length, a JSON header with every tensor's dtype, shape and byte
range, then the bytes. Every shape and dtype is known from the DCP metadata before any tensor is read,
so the header is written first and tensors follow one block of rows at a time: memory holds one block,
not a tensor or a shard. The file is written around the page cache where the file system allows it
(``io.direct_file``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from flame_ext.io.direct_file import DirectFile
from flame_ext.io.specs import SAFETENSORS_CODES, TensorSpec, dtype_name

__all__ = ["write_safetensors", "shard_plan"]


def shard_plan(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    return shards


def write_safetensors(
    file: Path,
    specs: dict[str, TensorSpec],
    read: Callable[[str], Iterable[torch.Tensor]],
    on_written: Callable[[int], None] = lambda n: None,
) -> None:
    """Write ``specs`` (in order) to ``file``; ``read(key)`` gives the tensor as consecutive blocks of rows,
    asked for only when that tensor is written (a 0-d tensor is one block of itself)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, spec in specs.items():
        header[key] = {
            "dtype": SAFETENSORS_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with DirectFile(file) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, spec in specs.items():
            rows = 0
            for block in read(key):
                if tuple(block.shape[1:]) != spec.shape[1:] or dtype_name(block.dtype) != spec.dtype:
                    raise ValueError(
                        f"{key}: got a block {tuple(block.shape)} {block.dtype}, planned {spec.shape} {spec.dtype}"
                    )
                rows += block.shape[0] if spec.shape else 1
                data = block.contiguous().view(-1).view(torch.uint8).numpy().data if block.numel() else memoryview(b"")
                f.write(data)
                on_written(len(data))
            if rows != (spec.shape[0] if spec.shape else 1):
                raise ValueError(f"{key}: got {rows} rows, planned {spec.shape}")
        f.flush()
