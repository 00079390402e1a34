"""Non-persistent buffers: the part of a model no checkpoint holds.

RoPE's ``inv_freq`` is registered with ``persistent=False``. Trainers build the model on ``meta`` and call
``to_empty()``, which leaves such buffers as uninitialised memory; no checkpoint load restores them, and
with transformers 4.x ``post_init()`` does not recompute them either. The expected value of each buffer
is therefore derived the way the module derives it (from its config, or by the module's own method that
fills its buffers, run on a stand-in copy), and compared.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flame_ext.report import Problem

__all__ = ["nonpersistent_buffer_modules", "fresh_buffers", "check_buffers", "load_path_hazards"]

logger = logging.getLogger(__name__)

_RTOL, _ATOL = 1e-5, 1e-6  # same formula on another device can differ in the last bits; garbage is far off


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


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex buffers (torchtitan's RoPE cache) compared on real and imaginary parts alike."""
    t = t.detach().cpu()
    return torch.view_as_real(t).double() if t.is_complex() else t.double()


def _describe(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a = _real(actual)
    diff = (a - _real(expected)).abs()
    finite = torch.isfinite(a).all().item()
    worst = diff.max().item() if diff.numel() else 0.0
    return f"max abs diff {worst:.3g} from its config-derived value" + ("" if finite else " (holds non-finite values)")


def _matches(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(_real(actual), _real(expected), rtol=_RTOL, atol=_ATOL)


def check_buffers(model: nn.Module, *, repair: bool) -> tuple[list[Problem], list[str]]:
    """Compare every non-persistent buffer with its config-derived value; repair in place when asked.

    Returns (problems, repaired buffer names). A repaired buffer is not a problem; it is logged.
    """
    problems: list[Problem] = []
    repaired: list[str] = []
    for mod_name, module, names in nonpersistent_buffer_modules(model):
        expected = fresh_buffers(module)
        for b in names:
            key = f"{mod_name}.{b}" if mod_name else b
            actual = module._buffers[b]
            if expected is None or b not in expected:
                problems.append(
                    Problem(
                        "buffer_mismatch",
                        "warning",
                        key,
                        "no config-derived value to check it against",
                        f"check {type(module).__name__} sets {b} itself after the model is materialised",
                    )
                )
                continue
            if _matches(actual, expected[b]):
                continue
            detail = _describe(actual, expected[b])
            if repair:
                with torch.no_grad():
                    actual.copy_(expected[b].to(dtype=actual.dtype, device=actual.device))
                logger.warning("flame-ext: repaired non-persistent buffer %s (%s)", key, detail)
                repaired.append(key)
            else:
                problems.append(
                    Problem(
                        "buffer_mismatch",
                        "error",
                        key,
                        detail,
                        "the model was built on meta and materialised with to_empty(), which leaves non-persistent "
                        "buffers uninitialised and no checkpoint restores them; set checkpoint.initial_load_repair_buffers "
                        "= true, or recompute them after to_empty() (e.g. upgrade to transformers >= 5, whose post_init does)",
                    )
                )
    return problems, repaired


def load_path_hazards(build_meta: Any) -> list[Problem]:
    """Buffers that meta -> to_empty -> post_init() leaves wrong with the installed transformers (warnings).

    ``build_meta`` returns a fresh model on ``meta``. This is a property of the load path, not of any
    checkpoint: it is reported so the user knows a trainer that builds models this way needs a repair.
    """
    model = build_meta()
    model.to_empty(device="cpu")
    # Poison the memory to_empty() left, so that "happens to be right" cannot pass for "was recomputed".
    for _, module, names in nonpersistent_buffer_modules(model):
        for b in names:
            module._buffers[b].fill_(float("nan"))
    if hasattr(model, "post_init"):
        # As flame does before its post_init(): transformers 4.x marks modules initialised when the model is
        # built and would skip them all; flame clears the mark so every module's _init_weights runs again.
        model.apply(lambda m: setattr(m, "_is_hf_initialized", False))
        model.post_init()
    problems, _ = check_buffers(model, repair=False)
    import transformers

    hazards = []
    for p in problems:
        if p.severity != "error":
            continue
        hazards.append(
            Problem(
                "buffer_mismatch",
                "warning",
                p.key,
                f"building this model on meta + to_empty() + post_init() leaves {p.key} uninitialised with the installed "
                f"transformers {transformers.__version__}",
                "not a fault of this checkpoint: a trainer that builds the model this way (flame does) must recompute it; "
                "turn on the training guard with checkpoint.initial_load_repair_buffers = true, or use transformers >= 5",
            )
        )
    return hazards
