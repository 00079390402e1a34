"""What a host's load asks for and what it filled: specs and tensors of the trainer's own state dict.

Nothing here reads a tensor's data or runs a collective: DTensor ``shape`` is the global shape, which is
what the checkpoint metadata records, and a ``ModelWrapper``'s ``state_dict()`` gives each rank its shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flame_ext.io.specs import TensorSpec, dtype_name

__all__ = ["RequestedLoad", "split_request", "meta_copy", "tied_keys", "model_state"]


@dataclass
class RequestedLoad:
    """What a load will ask DCP for: model tensors by key (global shapes), and other states by name."""

    model: dict[str, TensorSpec]
    other_states: list[str]
    model_prefix: str = ""  # "model." when the model sits nested in a full training-state load


def split_request(state: Mapping[str, Any]) -> RequestedLoad:
    """The specs of the exact state dict a host passes to ``dcp.load``, without reading or moving data.

    Tensors at the top level are model keys (torchtitan's model-only and 0.3 full loads are flat); a
    ``model`` entry that is a Stateful or dict is the model nested under ``model.`` (torchtitan 0.1 full
    loads); anything else (optimizer, lr_scheduler, dataloader, train_state) is another state, checked by
    name only, because building an optimizer's state dict can cost collectives.
    DTensor ``shape`` is the global shape, which is what the checkpoint metadata records.
    """
    model: dict[str, TensorSpec] = {}
    other: list[str] = []
    prefix = ""
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            model[key] = TensorSpec(tuple(value.shape), dtype_name(value.dtype))
        elif key == "model" and value is not None:
            prefix = "model."
            inner = value.state_dict() if hasattr(value, "state_dict") else value
            for k, v in inner.items():
                if isinstance(v, torch.Tensor):
                    model[prefix + k] = TensorSpec(tuple(v.shape), dtype_name(v.dtype))
        elif value is not None:
            other.append(key)
    return RequestedLoad(model, other, prefix)


def meta_copy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Meta tensors with the global shape and dtype of each tensor: feed a key-mapping adapter (``to_hf``)
    without computing anything or running a collective on sharded tensors."""
    return {
        k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
        for k, v in state_dict.items()
    }


def tied_keys(parts: Iterable[nn.Module], prefix: str = "") -> dict[str, str]:
    """Tied aliases of all parts, keyed the way the load names them."""
    from flame_ext.io.hf import tied_aliases

    return {prefix + a: prefix + s for part in parts for a, s in tied_aliases(part).items()}


def model_state(wrapper: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The trainer's own parameters after the load, keyed as the checkpoint names them.

    ``wrapper`` is the host's ``ModelWrapper`` (``states["model"]``): its ``state_dict()`` is what the host
    loads into, with the host's key hooks applied, FSDP/TP parameters as DTensors (each rank its shards),
    and no collective.
    """
    return {prefix + k: v for k, v in wrapper.state_dict().items()}
