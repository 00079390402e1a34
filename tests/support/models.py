"""The one tiny-model factory: a random HF model of any transformers architecture, small enough to build in a
fraction of a second, saved as an HF folder (optionally in shards, optionally with a byte-level tokenizer).

The embedded trained OLMo2 (``flame_ext/assets/tiny-olmo2``, the ``tiny_model`` fixture) is the model whose
loss means something; these are for tests that check that bytes, keys and shapes arrive whole.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY", "tiny_config", "save_tiny_model", "meta_model", "byte_tokenizer", "built_once"]

# The tiny shape every test starts from: byte ids (0-255) plus end-of-text at 256, padded to 260.
TINY: dict[str, Any] = {
    "vocab_size": 260,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
_BYTE_IDS = {"eos_token_id": 256, "pad_token_id": 256, "bos_token_id": None}


def tiny_config(arch: str = "olmo2", **overrides: Any) -> Any:
    """The config of a tiny ``arch`` model (a transformers ``model_type``): ``TINY`` with ``overrides`` on top.

    The byte-level special ids (end-of-text and padding at 256) are set only while the vocabulary is the
    default one: a test that picks its own vocabulary picks its own ids (or has none).
    """
    from transformers import AutoConfig

    fields = {**TINY, **overrides}
    if fields["vocab_size"] == TINY["vocab_size"]:
        fields = {**_BYTE_IDS, **fields}
    return AutoConfig.for_model(arch, **fields)


def save_tiny_model(
    out: Path,
    arch: str = "olmo2",
    *,
    seed: int = 0,
    shard_kb: int | None = None,
    tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """A random tiny ``arch`` model (``tiny_config``) saved with ``save_pretrained`` to ``out``: in shards of
    ``shard_kb`` KB when given (the layout of real multi-file repos), with ``byte_tokenizer`` when asked."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.save_pretrained(out, **({"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}))
    if tokenizer:
        byte_tokenizer().save_pretrained(out)
    return Path(out)


def meta_model(folder: Path) -> torch.nn.Module:
    """The model of an HF folder as trainers build it: on ``meta``, then ``to_empty`` (uninitialised memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return model.to_empty(device="cpu")


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: ids 0-255 are the bytes, ``<|endoftext|>`` is added after them (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable character per byte value
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def built_once(out: Path, build: Callable[[Path], Any]) -> Path:
    """``out``, built by ``build(folder)`` the first time it is asked for and reused after (across sessions when
    ``out`` is under pytest's cache folder). Built beside it and renamed, so a concurrent session sees the
    whole folder or none."""
    out = Path(out)
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    build(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another session finished first: its folder is as good
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
