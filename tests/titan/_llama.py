"""torchtitan 0.3's llama3 debug model and an HF LlamaForCausalLM with the same architecture.

The HF model is the trusted side (transformers computes its reference loss); torchtitan loads its
safetensors through its own ``Llama3StateDictAdapter`` (``initial_load_in_hf``) or from a DCP made with
that adapter, as torchtitan's ``convert_from_hf`` script does. CPU: FlexAttention is swapped for causal
SDPA, as ``cpu_overrides.cpu_sdpa`` does for the trainer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

DEBUG = dict(dim=256, n_layers=6, n_heads=16, ffn=768, vocab=2048, theta=500000.0)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def debug_model_config(n_layers: int = DEBUG["n_layers"]):
    """The llama3 ``debugmodel`` flavor (optionally fewer layers). 0.3: SDPA attention, for CPU training (Flex
    has no CPU backward). A batch-folding torchtitan (main) refuses SDPA for language models; the guard's
    forward pass runs without grad, which Flex does on CPU, so Flex stays."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    from flame_ext.titan.v03 import FOLDS_BATCH

    config = model_registry("debugmodel").model
    config.layers = config.layers[:n_layers]
    if FOLDS_BATCH:
        return config
    for _, _, parent, attr in list(config.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return config


def build_like_trainer(config) -> nn.Module:
    """Trainer.__init__'s way: build on meta, ``to_empty``, ``init_weights`` (which computes the RoPE cache)."""
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.train()


def make_hf_llama(
    out: Path, tokenizer_from: Path, n_layers: int = DEBUG["n_layers"], seed: int = 0, scale: float = 4.0
) -> Path:
    """A random HF Llama with the debug model's architecture (llama3 RoPE scaling included), saved with a
    tokenizer whose ids fit the 2048-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        vocab_size=DEBUG["vocab"],
        hidden_size=DEBUG["dim"],
        intermediate_size=DEBUG["ffn"],
        num_hidden_layers=n_layers,
        num_attention_heads=DEBUG["n_heads"],
        num_key_value_heads=DEBUG["n_heads"],
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={**rope, "rope_theta": DEBUG["theta"]},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than init: a model whose loss reacts to its weights
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    return out


def convert_with_adapter(hf_dir: Path, out: Path, config) -> Path:
    """HF safetensors -> torchtitan DCP the way torchtitan's convert_from_hf script does it."""
    from torchtitan.components.checkpointer import ModelWrapper
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    model = build_like_trainer(config)
    adapter = Llama3StateDictAdapter(config, str(hf_dir))
    hf_sd = adapter.to_hf(ModelWrapper(model)._get_state_dict())
    dcp.load(hf_sd, storage_reader=dcp.HuggingFaceStorageReader(str(hf_dir)), no_dist=True)
    dcp.save(adapter.from_hf(hf_sd), checkpoint_id=str(out), no_dist=True)
    return out
