"""Tensors the tests build: values shaped like trained weights."""

from __future__ import annotations

import torch

__all__ = ["trained_like"]


def trained_like(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Weights with some structure (row scales differ), as trained projections have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    if x.dim() >= 2:
        x = x * (1 + torch.rand(shape[0], *([1] * (x.dim() - 1)), generator=g))
    return x.to(dtype)
