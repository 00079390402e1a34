"""Non-persistent buffers: the part of a model no checkpoint holds.

RoPE's ``inv_freq`` is registered with ``persistent=False``. Trainers build the model on ``meta`` and call
``to_empty()``, which leaves such buffers as uninitialised memory; no checkpoint load restores them, and
with transformers 4.x ``post_init()`` does not recompute them either. The expected value of each buffer
is therefore derived the way the module derives it (from its config, or by the module's own method that
fills its buffers, run on a stand-in copy), and compared.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from flame_ext.model.buffer_rebuild import fresh_buffers, nonpersistent_buffer_modules
from flame_ext.report import Problem

__all__ = ["nonpersistent_buffer_modules", "fresh_buffers", "check_buffers", "load_path_hazards"]

logger = logging.getLogger(__name__)

_RTOL, _ATOL = 1e-5, 1e-6  # same formula on another device can differ in the last bits; garbage is far off


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


def check_buffers(model: nn.Module, *, repair: bool, after: str | None = None) -> tuple[list[Problem], list[str]]:
    """Compare every non-persistent buffer with its config-derived value; repair in place when asked.

    Returns (problems, repaired buffer names). A repaired buffer is not a problem; it is logged (at WARNING,
    naming ``after``, the checkpoint just loaded, when given).
    """
    problems: list[Problem] = []
    repaired: list[str] = []
    for mod_name, module, names in nonpersistent_buffer_modules(model):
        expected = fresh_buffers(module)
        for b in names:
            key = f"{mod_name}.{b}" if mod_name else b
            actual = module.get_buffer(b)
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
                loaded = f" after loading {after}" if after else ""
                logger.warning("flame-ext: repaired non-persistent buffer %s%s (%s)", key, loaded, detail)
                repaired.append(key)
            else:
                problems.append(
                    Problem(
                        "buffer_mismatch",
                        "error",
                        key,
                        detail,
                        "the model was built on meta and materialised with to_empty(), which leaves non-persistent "
                        "buffers uninitialised and no checkpoint restores them; set "
                        "checkpoint.initial_load_repair_buffers "
                        "= true, or recompute them after to_empty() (e.g. upgrade to transformers >= 5, whose "
                        "post_init does)",
                    )
                )
    return problems, repaired


def load_path_hazards(build_meta: Any) -> list[Problem]:
    """Buffers that meta -> to_empty -> post_init() leaves wrong with the installed transformers (warnings).

    ``build_meta`` returns a fresh model on ``meta``. This is a property of the load path, not of any
    checkpoint: it is reported so the user knows a trainer that builds models this way needs a repair.
    """
    model = build_meta()
    # Only the modules holding non-persistent buffers get memory (their own tensors: rotary embeddings hold
    # no weights); every weight stays on meta, where post_init()'s initialisers run without memory. The whole
    # model materialised took the 7B's size in RSS here, for a check of a few KB of buffers.
    for _, module, names in list(nonpersistent_buffer_modules(model)):
        module.to_empty(device="cpu", recurse=False)
        # Poison the memory to_empty() left, so that "happens to be right" cannot pass for "was recomputed".
        for b in names:
            module.get_buffer(b).fill_(float("nan"))
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
                f"building this model on meta + to_empty() + post_init() leaves {p.key} uninitialised with the "
                "installed "
                f"transformers {transformers.__version__}",
                "not a fault of this checkpoint: a trainer that builds the model this way (flame does) must "
                "recompute it; "
                "turn on the training guard with checkpoint.initial_load_repair_buffers = true, or use transformers "
                ">= 5",
            )
        )
    return hazards
