"""Which HF tensors a ``from_hf`` call stacks into each of its outputs, as the adapter itself does it.

An MoE adapter builds a layer's ``[E, ...]`` experts tensor with ``torch.stack`` of the E HF tensors along the
first dimension. Watching that call (a ``TorchFunctionMode``, while ``from_hf`` runs on ``meta`` tensors) gives
the adapter's own key mapping and expert order for that output, without a key table: rows ``[s, e)`` of the
output are then ``torch.stack`` of HF tensors ``s .. e-1``, the same bytes the adapter's whole stack holds, and
can be read one row block at a time. Only a stack whose every input is one of the HF tensors as given, along
the first dimension, and that reaches ``from_hf``'s result unchanged is taken; any other output is the
adapter's to compute whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_watching_stacks"]


class _StackWatch(TorchFunctionMode):
    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self._names = names
        self.made: dict[int, tuple[torch.Tensor, list[str]]] = {}  # id(output) -> (output, HF keys in order)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.stack and isinstance(out, torch.Tensor):
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            keys = [self._names.get(id(t)) for t in tensors]
            if dim in (0, -out.dim()) and keys and all(k is not None for k in keys):
                self.made[id(out)] = (out, [k for k in keys if k is not None])
        return out


def apply_watching_stacks(
    from_hf: Callable[[dict[str, Any]], dict[str, Any]], hf_sd: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``from_hf(hf_sd)`` and, for each of its outputs that is a first-dimension ``torch.stack`` of tensors of
    ``hf_sd`` as given, the HF keys stacked, in order."""
    watch = _StackWatch({id(v): k for k, v in hf_sd.items()})
    with watch:
        out = from_hf(hf_sd)
    stacked = {}
    for key, value in out.items():
        made = watch.made.get(id(value))
        if made is not None and made[0] is value:
            stacked[key] = made[1]
    return out, stacked
