"""Generated OLMo2-shaped HF checkpoints for the benchmarks, and the shared measuring helpers.

One generator for every bench: a real ``Olmo2ForCausalLM`` config, ~1 GB safetensors shards of random
data written one at a time (only one shard's tensors exist in memory: the shapes come from the model
built on ``meta``), norms at 1, and optionally the embedded model's byte-level tokenizer (for the
reference forward).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SHARD_BYTES = 1_000_000_000
VOCAB = 100352
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32)
# The smoke runs' shape (``tests/bench``): a few MB, so that every bench runs end to end in seconds. A size
# below TINY_GB is made with it, whatever width the bench uses for real sizes.
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
TINY_VOCAB = 1024
TINY_GB = 0.1

# flame's converter: from_pretrained -> state_dict() -> dcp.save with 8 writer threads.
STOCK = """
import sys, torch, torch.distributed.checkpoint as DCP
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
state_dict = model.state_dict()
storage_writer = DCP.filesystem.FileSystemWriter(sys.argv[2], thread_count=8)
DCP.save({"model": state_dict}, storage_writer=storage_writer)
"""

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
WARM_TOOLS = (
    "import torch, torch.distributed.checkpoint, transformers, transformers.models.olmo2.modeling_olmo2, "
    "flame_ext.convert"
)


def layers_for(size_gb: float, hidden: int, intermediate: int, itemsize: int, vocab: int = VOCAB) -> int:
    """Decoder layers that bring an untied model of this width to about ``size_gb`` GB."""
    per_layer = (4 * hidden * hidden + 3 * hidden * intermediate + 4 * hidden) * itemsize  # attention, MLP, norms
    fixed = (2 * vocab * hidden + hidden) * itemsize  # embeddings, lm_head, final norm
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def sized_config(size_gb: float, width: dict, dtype: str) -> dict:
    """config.json of an OLMo2 of about ``size_gb`` GB at ``dtype``: ``width`` (hidden_size, intermediate_size,
    num_attention_heads) with as many layers as it takes; below ``TINY_GB`` the tiny shape and vocabulary."""
    vocab = TINY_VOCAB if size_gb < TINY_GB else VOCAB
    width = TINY if size_gb < TINY_GB else width
    itemsize = 4 if dtype == "float32" else 2
    layers = layers_for(size_gb, width["hidden_size"], width["intermediate_size"], itemsize, vocab)
    shape = {**width, "num_key_value_heads": width["num_attention_heads"], "num_hidden_layers": layers}
    return olmo2_config(shape, dtype, vocab)


def olmo2_config(shape: dict, dtype: str, vocab: int = VOCAB) -> dict:
    """config.json of an Olmo2ForCausalLM with ``shape`` (hidden_size, intermediate_size, heads, layers)."""
    from transformers import Olmo2Config

    cfg = Olmo2Config(
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=1,
        eos_token_id=vocab - 1,
        bos_token_id=None,
        tie_word_embeddings=False,
        **shape,
    )
    cfg.architectures = ["Olmo2ForCausalLM"]
    out = cfg.to_dict()
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype
    return out


def generate(folder: Path, config: dict, *, dtype: str, std: float, tokenizer: bool) -> int:
    """Write config.json, the shards (random normal * ``std`` at ``dtype``, norms 1) and the index; with
    ``tokenizer`` also the embedded model's byte-level tokenizer. Returns the total tensor bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Olmo2Config, Olmo2ForCausalLM

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        from flame_ext.io.hf import DEFAULT_MODEL

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(DEFAULT_MODEL / name, folder / name)
    torch_dtype = getattr(torch, dtype)
    itemsize = torch_dtype.itemsize
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Olmo2ForCausalLM(Olmo2Config.from_dict(config)).state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        if groups[-1] and size + itemsize * shape.numel() > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += itemsize * shape.numel()
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for k in keys:
            if k.endswith("norm.weight"):
                shard[k] = torch.ones(shapes[k], dtype=torch_dtype)
            else:
                shard[k] = torch.randn(shapes[k], generator=gen, dtype=torch_dtype)
                if std != 1.0:
                    shard[k].mul_(std)
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * itemsize for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_page_cache() -> None:
    """Empty the page cache (root), then read the libraries back: the checkpoint is cold, the tools are not."""
    os.sync()
    DROP_CACHES.write_text("3\n")
    subprocess.run([sys.executable, "-c", WARM_TOOLS], check=True)
