"""Write a random OLMo2 as an HF folder (``save_pretrained``, several safetensors shards) for the reliability tests.

    python make_model.py OUT --hidden 64 --layers 2 --vocab 260 --shard-kb 60 [--tokenizer]

Random weights are enough here: these tests check that bytes arrive whole, not what the model computes.
``--tokenizer`` adds a byte-level tokenizer (ids 0-255 are bytes, 256 is end-of-text), so the commands that
run the HF model (the reference loss) get past loading it.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=260)
    p.add_argument("--shard-kb", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", action="store_true")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = Olmo2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
    )
    Olmo2ForCausalLM(cfg).save_pretrained(a.out, max_shard_size=f"{a.shard_kb}KB")
    if a.tokenizer:
        byte_tokenizer().save_pretrained(a.out)


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable character per byte value
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


if __name__ == "__main__":
    main()
