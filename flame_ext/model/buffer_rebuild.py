"""How a model builds the buffers no checkpoint holds (RoPE ``inv_freq`` and the like).

A non-persistent buffer is computed when its module is constructed. A model built on ``meta`` and
materialised with ``to_empty()`` has none of them right; this module knows how to compute them again for
one module, on the CPU, without touching its parameters. The check that compares them lives in
``checks/nonpersistent_buffers.py``; the streamed reference forward uses the same construction.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["nonpersistent_buffer_modules", "fresh_buffers"]

logger = logging.getLogger("flame_ext.checks.nonpersistent_buffers")


def nonpersistent_buffer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(module name, module, its non-persistent buffer names) for every module that has any."""
    for name, module in model.named_modules():
        names = sorted(b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None)
        if names:
            yield name, module, names


def fresh_buffers(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The buffers ``module`` builds for itself, computed afresh on the CPU; None when it cannot say.

    Three constructions cover the hosts, tried in turn: HF modules that keep their ``config`` (rotary
    embeddings are built as ``cls(config)``); torchtitan 0.3 modules that recompute buffers in
    ``_init_self_buffers``; and any module that (re)computes them in ``reset_parameters()``, as
    flash-linear-attention's ``RotaryEmbedding`` does for ``inv_freq`` and ``scale``. The last two run on
    a stand-in of the module (see ``_recomputed_by``), never on the module itself, so no trained parameter
    is touched.
    """
    config = getattr(module, "config", None)
    if config is not None:
        try:
            with torch.device("cpu"):
                fresh = type(module)(config)
            return {k: v for k, v in fresh._buffers.items() if v is not None}
        except Exception as exc:  # an unknown constructor signature: fall through to the next way
            logger.debug("cannot rebuild %s from its config: %s", type(module).__name__, exc)
    for method in ("_init_self_buffers", "reset_parameters"):
        if callable(getattr(module, method, None)):
            derived = _recomputed_by(module, method)
            if derived:
                return derived
    return None


def _stand_in(module: nn.Module, fill: int) -> nn.Module:
    """A copy of ``module`` and its children sharing nothing that can be written: parameters are empty
    ``meta`` tensors (nothing to copy, nothing to overwrite), buffers CPU tensors filled with ``fill``."""
    clone = copy.copy(module)  # the attributes a method reads (sizes, bases, flags), in a dict of its own
    clone.__dict__["_parameters"] = {
        k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad)
        for k, p in module._parameters.items()
    }
    clone.__dict__["_buffers"] = {
        k: None if b is None else torch.full(tuple(b.shape), fill, dtype=b.dtype, device="cpu")
        for k, b in module._buffers.items()
    }
    clone.__dict__["_modules"] = {k: None if m is None else _stand_in(m, fill) for k, m in module._modules.items()}
    return clone


def _recomputed_by(module: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The buffers ``module.<method>()`` computes, by running it twice on stand-ins whose buffers start at 0
    and at 1: a buffer that comes out the same both times was computed by the method; one it left alone, or
    filled with random values, comes out different and is not claimed."""
    runs = []
    for fill in (0, 1):
        try:
            clone = _stand_in(module, fill)
            with torch.no_grad():
                getattr(clone, method)()
        except Exception as exc:  # the method needs real parameters, a device, ...: it cannot say
            logger.debug("cannot recompute buffers of %s with %s(): %s", type(module).__name__, method, exc)
            return {}
        runs.append({k: v for k, v in clone._buffers.items() if v is not None})
    first, second = runs
    return {
        k: v
        for k, v in first.items()
        if k in second and v.shape == second[k].shape and v.dtype == second[k].dtype and torch.equal(v, second[k])
    }
