"""Tiny random models of every architecture the streamed forwards are tested on (imported as
``from arch_support import``): Llama with GQA, Qwen2 with tied embeddings, Mistral with a sliding window,
Qwen3, OLMo2, Gemma2 with logit soft-capping, GPT-2; each saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch
from support.models import save_tiny_model, tiny_config

VOCAB = 300
ARCHS = ["llama_gqa", "qwen2_tied", "mistral", "qwen3", "olmo2", "gemma2", "gpt2"]
# Gemma2's scaled embedding keeps its scale as a non-persistent buffer built from constructor arguments
# the module does not keep, so it cannot be rebuilt alone: it takes the whole-model path, with a note.
MAY_FALL_BACK = {"gemma2"}


# arch -> (model_type, what differs from the one tiny shape of support.models).
_ARCH_FIELDS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("llama", {"num_key_value_heads": 2}),
    "qwen2_tied": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": ("mistral", {"num_key_value_heads": 2, "sliding_window": 32}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
    "olmo2": ("olmo2", {}),
    "gemma2": ("gemma2", {"num_key_value_heads": 2, "head_dim": 16, "final_logit_softcapping": 30.0}),
    "gpt2": ("gpt2", {}),
}


def arch_config(arch: str, layers: int = 3) -> object:
    """The tiny config of ``arch`` (``support.models.tiny_config``) with ``layers`` decoder layers."""
    model_type, fields = _ARCH_FIELDS[arch]
    return tiny_config(model_type, vocab_size=VOCAB, num_hidden_layers=layers, **fields)


def save_arch_model(arch: str, out: Path, layers: int = 3) -> Path:
    """A random ``arch`` model (seed 0) saved as an HF folder at ``out``."""
    model_type, fields = _ARCH_FIELDS[arch]
    return save_tiny_model(out, model_type, vocab_size=VOCAB, num_hidden_layers=layers, **fields)


def token_ids(rows: int = 2, length: int = 64) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
