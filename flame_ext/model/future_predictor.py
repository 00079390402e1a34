"""An auxiliary future-token predictor head, defined once.

Training setups that add a future predictor to a causal LM need its tensors in the converted checkpoint,
initialised fresh. Defining the module here, and attaching the same module both when converting and
when building the training model, makes its keys and shapes agree by construction.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from flame_ext.command_options import HeadType

__all__ = ["FuturePredictorHead", "attach_future_predictor", "hidden_size", "ATTRIBUTE", "HEAD_TYPES"]

ATTRIBUTE = "future_predictor"
HEAD_TYPES: tuple[HeadType, ...] = get_args(HeadType)


class FuturePredictorHead(nn.Module):
    """``linear``: hidden -> hidden; ``mlp``: hidden -> 4*hidden -> hidden with GELU."""

    def __init__(self, hidden_size: int, head_type: HeadType = "linear") -> None:
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"future predictor head type {head_type!r}; choose one of {', '.join(HEAD_TYPES)}")
        self.head_type = head_type
        if head_type == "linear":
            self.proj = nn.Linear(hidden_size, hidden_size)
        else:
            self.fc1 = nn.Linear(hidden_size, 4 * hidden_size)
            self.fc2 = nn.Linear(4 * hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_type == "linear":
            return self.proj(hidden)
        return self.fc2(nn.functional.gelu(self.fc1(hidden)))


def hidden_size(model: nn.Module) -> int:
    """The width of an HF causal LM (``nn.Module`` declares no ``config``; an HF model has one)."""
    return int(getattr(model, "config").hidden_size)


def attach_future_predictor(model: nn.Module, head_type: HeadType) -> FuturePredictorHead:
    """Add the head to an HF causal LM as ``model.future_predictor`` (on the model's device)."""
    device = next(model.parameters()).device
    with torch.device(device):
        head = FuturePredictorHead(hidden_size(model), head_type)
    setattr(model, ATTRIBUTE, head)
    return head
