"""Train the tiny byte-level OLMo-2 that flame-ext ships as its default model and test fixture.

Why it exists: flame-ext checks HF -> DCP conversions by comparing a reference loss before and after.
That check is only meaningful on a model that has learned something, and the failure it is built to
catch (RoPE ``inv_freq`` left as garbage after ``meta`` + ``to_empty()``) only shows on a model that
uses positions. Random weights give ln(257) everywhere, broken or not. This script makes a trained
model small enough to commit (~2 MB) and to run in tests on a CPU.

Run (from the project root, any transformers 4.57+ / 5.x with torch):
    python -m flame_ext.assets.train_tiny_olmo2               # rewrites flame_ext/assets/tiny-olmo2/
    python flame_ext/assets/train_tiny_olmo2.py --out /tmp/x  # same, into another folder

Produces in --out: config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json, special_tokens_map.json. Tokenizer: token id == byte value (0..255), plus
``<|endoftext|>`` = 256 (eos = bos = pad). No BOS is added on encode. The run is deterministic:
two runs on the same machine and library versions write byte-identical model.safetensors.

Data: every corpus/*.txt (~142 KB of original prose, see corpus/SOURCE.md), documents joined by
<|endoftext|>; held-out: reference.txt, never trained on. Held-out loss is measured on the first
2 x 512 bytes of reference.txt (prose only; flame-ext's default reference batch is now reference_mixed.txt,
on which this model scores 3.560 nats: it has seen no code, tables or other languages).

Measured (torch 2.13 CPU, transformers 5.24, 2 threads): 300 steps take ~45 s on an idle 2-core
machine (0.14 s/step) and several minutes when other jobs share the cores; the output does not change.
    held-out loss                                   1.761 nats  (uniform: ln 256 = 5.55)
    same model, inv_freq zeroed                     3.405 nats
    same model, inv_freq filled with random values  3.239 nats
Loaded with transformers 4.57.6 instead of 5.24 the folder gives the same loss (1.76113057 in both);
training under 4.57.6 writes byte-identical weights (only config.json spells RoPE the 4.x way).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # heavy imports stay inside the functions that need them
    from tokenizers import Tokenizer
    from transformers import Olmo2ForCausalLM

HERE = Path(__file__).resolve().parent
EOT = 256  # <|endoftext|>: the one special token, appended after the 256 byte tokens
VOCAB = 257  # == len(tokenizer); no padding, so vocab_size and the tokenizer cannot drift apart
SEQ_LEN = 512  # training and evaluation length: RoPE positions 0..511 must be learned
REF_ROWS = 2  # held-out batch = first 2 x 512 bytes of reference.txt (the reference batch's shape)

# Chosen by a small sweep on this corpus (~140 KB): 300 x 8 x 512 = 1.2M tokens (~9 epochs) reaches
# 1.76; 400 steps gave ~0.15 nats less but take a third longer; 6e-3 was worse than 3e-3.
STEPS, BATCH, LR, WARMUP = 300, 8, 3e-3, 20


def byte_level_tokenizer() -> Tokenizer:
    """A `tokenizers` BPE with no merges over the GPT-2 byte alphabet, ids arranged so id == byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # ByteLevel maps each byte to a printable character (GPT-2's bytes_to_unicode); rebuild that
    # table so that the character standing for byte b gets id b.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 256)]
    extra = iter(range(256, 512))
    char_of = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={char_of[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok


def save_tokenizer(out: Path) -> None:
    """Write the tokenizer files by hand rather than with save_pretrained: transformers 5 would record
    ``tokenizer_class: TokenizersBackend``, a name transformers 4.x cannot load."""
    byte_level_tokenizer().save(str(out / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    added = {
        str(EOT): {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_model() -> Olmo2ForCausalLM:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # as in OLMo-2-7B: lm_head.weight is its own tensor in the checkpoint
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
    )
    config._attn_implementation = "sdpa"  # explicit; the default on both 4.57 and 5.x
    return Olmo2ForCausalLM(config)


def corpus_ids() -> torch.Tensor:
    """All corpus files as one stream of byte ids, each document followed by <|endoftext|>."""
    ids: list[int] = []
    for path in sorted((HERE / "corpus").glob("*.txt")):  # sorted: file order must not depend on the OS
        ids += [*path.read_bytes(), EOT]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def reference_loss(model: Olmo2ForCausalLM, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats), HF-style (labels = inputs), on REF_ROWS x SEQ_LEN ids."""
    x = ids[: REF_ROWS * SEQ_LEN].view(REF_ROWS, SEQ_LEN)
    return model(input_ids=x, labels=x).loss.item()


def train(model: Olmo2ForCausalLM, data: torch.Tensor) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)  # batch sampling has its own seeded stream
    model.train()
    for step in range(STEPS):
        # linear warm-up, then cosine decay to 10% of the peak
        lr = LR * min(1.0, (step + 1) / WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / STEPS)))
        for group in opt.param_groups:
            group["lr"] = lr
        # random full-length windows, so every position 0..511 is trained at every step
        starts = torch.randint(0, data.numel() - SEQ_LEN - 1, (BATCH,), generator=gen)
        chunk = torch.stack([data[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  train loss {loss.item():.4f}  lr {lr:.2e}", flush=True)
    model.eval()


def check_broken_rope(model: Olmo2ForCausalLM, ref: torch.Tensor) -> dict[str, float]:
    """Loss with inv_freq overwritten as after meta + to_empty() (the bug flame-ext detects)."""
    rotary = model.model.rotary_emb
    good = rotary.inv_freq.clone()
    garbage = {
        "zeros": torch.zeros_like(good),
        "random": torch.rand(good.shape, generator=torch.Generator().manual_seed(1)),
    }
    losses = {}
    for name, values in garbage.items():
        rotary.inv_freq.copy_(values)
        losses[name] = reference_loss(model, ref)
    rotary.inv_freq.copy_(good)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny-olmo2", help="output folder (default: %(default)s)")
    out: Path = parser.parse_args().out

    torch.manual_seed(0)  # model initialisation
    torch.set_num_threads(2)  # float sums depend on the thread split: fix it for byte-identical output
    torch.use_deterministic_algorithms(True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    model = build_model()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    train(model, corpus_ids())
    train_s = time.time() - start

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)

    # Check the folder as users will load it, not the in-memory objects.
    tok = AutoTokenizer.from_pretrained(out)
    text = (HERE / "reference.txt").read_text(encoding="utf-8")
    ref = torch.tensor(tok(text, verbose=False)["input_ids"], dtype=torch.long)  # no >1024 warning
    assert tok.encode("Hello") == [72, 101, 108, 108, 111], tok.encode("Hello")
    assert ref.tolist() == list(text.encode("utf-8")) and tok.decode(ref.tolist()) == text
    assert len(tok) == VOCAB and tok.eos_token_id == EOT and ref.numel() >= REF_ROWS * SEQ_LEN
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    loss = reference_loss(loaded, ref)
    broken = check_broken_rope(loaded, ref)
    print(f"wrote {out} (training {train_s:.1f} s)")
    print(f"held-out loss, reference.txt {REF_ROWS}x{SEQ_LEN}: {loss:.4f} nats (uniform {math.log(256):.2f})")
    for name, value in broken.items():
        print(f"  with inv_freq = {name}: {value:.4f} nats")
    assert loss < 2.2 and min(broken.values()) > loss + 1.0, "model is not trained or not position-sensitive"


if __name__ == "__main__":
    main()
