"""Tiny flash-linear-attention (fla) models, built from their fla configs and saved the way users get them.

Imported by the fla test modules (a helper module, not a conftest, so that ``tests/conftest.py`` stays the
one conftest named ``conftest`` on the path). Every model: hidden size 64, 2 layers, the embedded byte-level
tokenizer's 257-token vocabulary, float32, seeded. The families build on the CPU with both fla versions the
test environments pin (0.5.2 with transformers 4.57, 0.6.0 with transformers 5.x); their forward passes
need a GPU (Triton).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from flame_ext.io.hf import DEFAULT_MODEL

# family -> what its config needs beyond the common sizes (head counts that divide the hidden size)
FAMILIES: dict[str, dict[str, Any]] = {
    "gla": {"num_heads": 4},
    "gsa": {"num_heads": 4},
    "delta_net": {"num_heads": 4},
    "gated_deltanet": {"num_heads": 4, "head_dim": 16},
    "retnet": {"num_heads": 4},
    "rwkv7": {"head_dim": 16},
    "mamba2": {"num_heads": 8, "head_dim": 16, "expand": 2, "n_groups": 1, "state_size": 16},
    "hgrn": {},
    "abc": {"num_heads": 4},
    "bitnet": {"num_heads": 4},
}
# Families whose attention layers hold fla's RotaryEmbedding (non-persistent inv_freq, set by reset_parameters).
ROTARY = ("retnet", "abc", "bitnet")

_TOKENS = {"vocab_size": 257, "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}


def fla_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("flash-linear-attention")
    except Exception:
        return None


def require_fla() -> None:
    if fla_version() is None:
        # Both test environments pin it (requirements/*.txt): its absence is a broken environment, not a skip.
        pytest.fail("flash-linear-attention is not installed; install requirements/titan03.txt or titan01.txt")


def fla_config(family: str) -> Any:
    from transformers import AutoConfig

    from flame_ext.io.registry import register_model_type

    require_fla()
    register_model_type(family, family)
    return AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=2, **_TOKENS, **FAMILIES[family])


def save_fla_model(family: str, out: Path) -> Path:
    """A random tiny model of ``family`` as ``save_pretrained`` writes it, with the embedded tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla's notes about kernels it would use on a GPU
        model = AutoModelForCausalLM.from_config(fla_config(family))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(DEFAULT_MODEL / f, out / f)
    return out


def like_flame(hf_dir: Path) -> torch.nn.Module:
    """flame's build (flame/train.py): ``from_config`` on meta, every module's ``_is_hf_initialized`` cleared,
    ``to_empty``, ``post_init()`` (which runs fla's ``_init_weights``, hence rotary ``reset_parameters``), train
    mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.apply(lambda m: setattr(m, "_is_hf_initialized", False))
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.post_init()
    return model.train()


def swap_first_two_layers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor layers 0 and 1 both have, exchanged (RWKV7's layer 0 alone has a ``pre_norm``)."""
    out = dict(sd)
    for key in sd:
        other = key.replace(".layers.0.", ".layers.1.")
        if other != key and other in sd:
            out[key], out[other] = sd[other], sd[key]
    return out
