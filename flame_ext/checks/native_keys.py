"""Which naming a set of model keys follows, Hugging Face's or torchtitan's own, and the one ``layout``
problem when the two meet.

A torchtitan model (llama3, qwen3, deepseek_v3, ...) asks for its own names (``tok_embeddings.weight``,
``layers.0.attention...``); an HF model class, and the checkpoints made from it, use HF's
(``model.embed_tokens.weight``, ``model.layers.0.self_attn...``). Given the other naming, a load finds none
of its keys: the user would see every key twice, once missing and once unexpected, with no word of the
cause. Diagnose and the guard (through ``checks.keys.compare_specs``) report one problem instead, naming
the cause and the command that writes the names the model asks for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from flame_ext.report import Problem

__all__ = ["Naming", "key_naming", "naming_problem", "torchtitan_module"]

Naming = Literal["hf", "torchtitan"]

# Keys only one naming has: HF nests the decoder under ``model.``; torchtitan's decoder sits at the top.
# (``lm_head.weight`` is in both, so it decides nothing.)
_MARKERS: dict[Naming, re.Pattern[str]] = {
    "hf": re.compile(r"^model\.(embed_tokens|layers\.\d+|norm)\."),
    "torchtitan": re.compile(r"^(tok_embeddings|layers\.\d+|norm)\."),
}
_MODULE = re.compile(r"^torchtitan\.(?:experiments\.)?models\.(\w+)")


def key_naming(keys: Iterable[str]) -> Naming | None:
    """The naming that more than half of ``keys`` follow; None when neither does (another model family)."""
    keys = list(keys)
    for naming, marker in _MARKERS.items():
        if keys and sum(1 for k in keys if marker.match(k)) * 2 > len(keys):
            return naming
    return None


def torchtitan_module(model: Any) -> str | None:
    """torchtitan's name of the model's module (``llama3`` for ``torchtitan.models.llama3.model.Llama3Model``),
    as ``--layout torchtitan:<module>`` takes it; None for a model that is not torchtitan's own."""
    for cls in type(model).__mro__:  # FSDP2 wraps the class in a subclass of its own module
        found = _MODULE.match(cls.__module__)
        if found:
            return found.group(1)
    return None


def _example(keys: Iterable[str], naming: Naming) -> str:
    return next((k for k in sorted(keys) if _MARKERS[naming].match(k)), next(iter(keys), ""))


def naming_problem(
    expected: Iterable[str], found: Iterable[str], *, module: str | None = None
) -> tuple[Problem, Naming, Naming] | None:
    """The ``layout`` problem when the model asks for one naming and the checkpoint has the other, with the
    command that fixes it; ``module`` is the torchtitan model's module when known (``<module>`` otherwise).
    Returns the problem and the two namings (expected, found), or None when the namings agree."""
    expected, found = list(expected), list(found)
    want, have = key_naming(expected), key_naming(found)
    if want is None or have is None or want == have:
        return None
    layout = f"torchtitan:{module or '<module>'}"
    if want == "torchtitan":
        detail = (
            f"the model asks for torchtitan's own key names ({len(expected)} keys, e.g. {_example(expected, want)}); "
            f"the checkpoint has Hugging Face names ({len(found)} keys, e.g. {_example(found, have)})"
        )
        hint = (
            "the checkpoint was converted for an HF model class; write the names this torchtitan model asks for "
            f"through its state-dict adapter: `flame-ext convert --model HF_MODEL --checkpoint OUT --layout {layout}`"
        )
    else:
        detail = (
            f"the model asks for Hugging Face key names ({len(expected)} keys, e.g. {_example(expected, want)}); "
            f"the checkpoint has torchtitan's own names ({len(found)} keys, e.g. {_example(found, have)})"
        )
        hint = (
            "the checkpoint was written for a torchtitan model (`flame-ext convert --layout torchtitan:<module>` or "
            "torchtitan's convert_from_hf); for an HF model class convert without --layout "
            "(`flame-ext convert --model HF_MODEL --checkpoint OUT`), or turn this checkpoint into HF files with "
            "`flame-ext to-hf` first"
        )
    return Problem("layout", "error", None, detail, hint), want, have
