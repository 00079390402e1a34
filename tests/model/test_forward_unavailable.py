"""Telling "this machine cannot run the model" (Triton without a GPU) from every other forward failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flame_ext.errors import ForwardUnavailableError
from flame_ext.model.reference_loss import forward_unavailable, run_forward

TRITON_NO_GPU = "0 active drivers ([]). There should only be one."  # triton.runtime.driver, verbatim


class Raises(nn.Module):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def forward(self, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:  # HF forwards take use_cache=...
        raise self.exc


def test_only_tritons_missing_driver_counts():
    assert "Triton" in forward_unavailable(RuntimeError(TRITON_NO_GPU))
    assert forward_unavailable(RuntimeError("2 active drivers ([a, b]). There should only be one.")) is None
    assert forward_unavailable(RuntimeError("CUDA out of memory")) is None
    assert forward_unavailable(ValueError(TRITON_NO_GPU)) is None


def test_run_forward_turns_it_into_a_user_error_and_lets_others_through():
    with pytest.raises(ForwardUnavailableError, match="Raises cannot run a forward pass on this machine"):
        run_forward(Raises(RuntimeError(TRITON_NO_GPU)), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_forward(Raises(RuntimeError("shape mismatch")), torch.zeros(1, 2, dtype=torch.long))
