"""How a model builds the buffers no checkpoint holds (RoPE ``inv_freq`` and the like).

A non-persistent buffer is computed when its module is constructed. A model built on ``meta`` and
materialised with ``to_empty()`` has none of them right; this module knows how to compute them again for
one module, on the CPU, without touching its parameters. The check that compares them lives in
``checks/buffers.py``; the streamed reference forward uses the same construction.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["nonpersistent_buffer_modules", "fresh_buffers"]

logger = logging.getLogger("flame_ext.checks.buffers")


def nonpersistent_buffer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(module name, module, its non-persistent buffer names) for every module that has any."""
    for name, module in model.named_modules():
        names = sorted(b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None)
        if names:
            yield name, module, names


def fresh_buffers(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The buffers a freshly built copy of ``module`` gets on the CPU, or None when it cannot be rebuilt.

    Two constructions cover the hosts: HF modules that keep their ``config`` (rotary embeddings are built
    as ``cls(config)``), and torchtitan 0.3 modules that recompute buffers in ``_init_self_buffers``.
    """
    config = getattr(module, "config", None)
    if config is not None:
        try:
            with torch.device("cpu"):
                fresh = type(module)(config)
            return {k: v for k, v in fresh._buffers.items() if v is not None}
        except Exception as exc:  # an unknown constructor signature: fall through to the next way
            logger.debug("cannot rebuild %s from its config: %s", type(module).__name__, exc)
    if hasattr(module, "_init_self_buffers"):
        try:
            clone = copy.deepcopy(module).to("cpu")
            clone._init_self_buffers()
            return {k: v for k, v in clone._buffers.items() if v is not None}
        except Exception as exc:
            logger.debug("cannot recompute buffers of %s: %s", type(module).__name__, exc)
    return None
