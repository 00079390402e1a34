"""Tiny random models of every architecture the streamed forwards are tested on (imported as
``from arch_support import``): Llama with GQA, Qwen2 with tied embeddings, Mistral with a sliding window,
Qwen3, OLMo2, Gemma2 with logit soft-capping, GPT-2; each saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
ARCHS = ["llama_gqa", "qwen2_tied", "mistral", "qwen3", "olmo2", "gemma2", "gpt2"]
# Gemma2's scaled embedding keeps its scale as a non-persistent buffer built from constructor arguments
# the module does not keep, so it cannot be rebuilt alone: it takes the whole-model path, with a note.
MAY_FALL_BACK = {"gemma2"}


def arch_config(arch: str, layers: int = 3) -> object:
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    configs = {
        "llama_gqa": lambda: tf.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2_tied": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=32),
        "qwen3": lambda: tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "gemma2": lambda: tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=256),
    }
    return configs[arch]()


def save_arch_model(arch: str, out: Path, layers: int = 3) -> Path:
    """A random ``arch`` model (seed 0) saved as an HF folder at ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(arch_config(arch, layers)).save_pretrained(out)
    return out


def token_ids(rows: int = 2, length: int = 64) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
