"""What a tensor is without its data: shape, dtype, and the dtype spellings of each file format.

One table maps safetensors' dtype codes to torch dtypes; the writer's inverse is derived from it, so the
reader and the writer cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorSpec", "dtype_name", "SAFETENSORS_DTYPES", "SAFETENSORS_CODES"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling used in reports, manifests and on the command line."""
    return str(dtype).removeprefix("torch.")


SAFETENSORS_CODES: dict[str, str] = {dtype_name(dtype): code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor, known without its data."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * getattr(torch, self.dtype).itemsize
