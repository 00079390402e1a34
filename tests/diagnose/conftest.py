"""Fixtures for ``flame-ext diagnose``: trained tiny models of three architectures and a catalogue of
checkpoints broken in every way the issue lists, each written with real ``torch.distributed.checkpoint``.

* ``hf_models``: the embedded trained OLMo2, plus a tiny Llama and a tiny Qwen2 trained here for a few
  hundred cheap steps on the bundled corpus with byte-level ids (the embedded model's tokenizer), enough
  that swapped layers or broken RoPE move the reference loss far beyond 0.1 nats. Trained once and kept in
  pytest's cache folder (keyed by recipe and library versions), so later sessions skip it.
* ``catalogue(arch, case)``: a DCP folder per case, built lazily from the healthy conversion by loading
  its tensors, changing them, and ``dcp.save``-ing a new checkpoint (manifest copied where the case is a
  checkpoint changed after conversion).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from support.cli import report_json

ARCHS = ("olmo2", "llama", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Small and quick: ~20 ms a step on one thread. 200 steps reach ~2.4 nats on the held-out text, where
# zeroed inv_freq costs ~0.3-0.6 nats and swapped layers ~1.5 (measured while building this fixture).
RECIPE = {
    "steps": 200,
    "batch": 8,
    "seq_len": 128,
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "lr": 1e-2,
    "warmup": 10,
}
# Per-architecture changes to RECIPE. Mistral has 4 layers: one middle layer's q_proj transposed then moves
# the mean loss by a few hundredths and each token by tenths (tests/checks/test_loss.py).
SHAPES = {"mistral": {"layers": 4}}
EOT, VOCAB = 256, 257
CORPUS = Path(__file__).resolve().parents[2] / "flame_ext" / "assets" / "corpus"

# Keys the catalogue edits: the same names in all three HF architectures.
SWAP = ("model.layers.0.", "model.layers.1.")
TRANSPOSED = "model.layers.0.self_attn.o_proj.weight"  # square in every architecture here
ZEROED_MLP = "model.layers.0.mlp."
NAN_KEY = "model.layers.1.self_attn.q_proj.weight"
DROPPED = "model.layers.1.mlp.down_proj.weight"
PAD_TO = 64


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than two contending."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _recipe(arch: str) -> dict:
    return {**RECIPE, **SHAPES.get(arch, {})}


def _config(arch: str):
    from support.models import tiny_config

    shape = _recipe(arch)
    return tiny_config(
        arch,
        vocab_size=VOCAB,
        hidden_size=shape["hidden"],
        intermediate_size=2 * shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        tie_word_embeddings=False,
    )


def _corpus_ids() -> torch.Tensor:
    ids: list[int] = []
    for path in sorted(CORPUS.glob("*.txt")):
        ids += [*path.read_bytes(), EOT]
    return torch.tensor(ids, dtype=torch.long)


def train_tiny(arch: str, out: Path, tokenizer_from: Path) -> Path:
    """Train a tiny ``arch`` model on the corpus (byte ids) and save it as an HF folder with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch))
    data = _corpus_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    seq = RECIPE["seq_len"]
    model.train()
    with one_thread():
        for step in range(RECIPE["steps"]):
            for group in opt.param_groups:
                group["lr"] = RECIPE["lr"] * min(1.0, (step + 1) / RECIPE["warmup"])
            starts = torch.randint(0, data.numel() - seq - 1, (RECIPE["batch"],), generator=gen).tolist()
            chunk = torch.stack([data[s : s + seq + 1] for s in starts])
            loss = F.cross_entropy(model(input_ids=chunk[:, :-1]).logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    model.eval().save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_from / name, tmp / name)
    try:
        os.replace(tmp, out)  # atomic: a concurrent session either sees the whole folder or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_key(arch: str, tokenizer_from: Path) -> str:
    """Everything the trained folder depends on: recipe, library versions, corpus and tokenizer bytes."""
    import transformers

    blob = json.dumps(
        {"arch": arch, "recipe": _recipe(arch), "torch": torch.__version__, "tf": transformers.__version__},
        sort_keys=True,
    )
    inputs = [p.read_bytes() for p in sorted(CORPUS.glob("*.txt"))] + [
        (tokenizer_from / n).read_bytes() for n in TOKENIZER_FILES
    ]
    return (
        f"{arch}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}-{hashlib.sha256(b''.join(inputs)).hexdigest()[:12]}"
    )


def trained(arch: str, tokenizer_from: Path, cache: Path) -> Path:
    """The tiny ``arch`` model trained on the corpus, from pytest's cache folder (trained there on first use)."""
    folder = cache / _cache_key(arch, tokenizer_from)
    if not (folder / "model.safetensors").is_file():
        train_tiny(arch, folder, tokenizer_from)
    return folder


@pytest.fixture(scope="session")
def hf_models(tiny_model, request) -> dict[str, Path]:
    """arch -> trained HF folder: the embedded OLMo2, and Llama / Qwen2 trained here (cached)."""
    cache = Path(request.config.cache.mkdir("flame-ext-diagnose-models"))
    return {"olmo2": tiny_model, **{arch: trained(arch, tiny_model, cache) for arch in ("llama", "qwen2")}}


@pytest.fixture(scope="session")
def tied_model(hf_models, tmp_path_factory) -> Path:
    """A Qwen2 with tied embeddings (lm_head shares the embedding): the trained Qwen2's embedding, tied."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(hf_models["qwen2"])
    cfg = src.config
    cfg.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(cfg)
    tied.load_state_dict({k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied.tie_weights()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    out = tmp_path_factory.mktemp("tied") / "qwen2-tied"
    tied.eval().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(hf_models["qwen2"] / name, out / name)
    return out


def convert(model: Path, out: Path, **kw) -> Path:
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    with one_thread():
        convert_hf_to_dcp(ConvertOptions(model=str(model), checkpoint=str(out), progress=False, **kw))
    return out


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (tiny models only)."""
    from flame_ext.io.dcp import load_tensor, read_dcp_metadata

    return {k: load_tensor(folder, k, spec) for k, spec in read_dcp_metadata(folder).items() if spec is not None}


def save_dcp(state: dict, out: Path, manifest_from: Path | None = None) -> Path:
    """A checkpoint written by torch's own ``dcp.save`` (default writer and planner, no process group)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(out), no_dist=True)
    if manifest_from is not None:
        shutil.copy2(manifest_from / "flame_ext.json", out / "flame_ext.json")
    return out


def swapped(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    a, b = SWAP
    out = dict(sd)
    for k in sd:
        if k.startswith(a):
            out[k], out[b + k[len(a) :]] = sd[b + k[len(a) :]], sd[k]
    return out


def _pad_vocab(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = sd[k].shape[0]
        padded = math.ceil(rows / PAD_TO) * PAD_TO
        out[k] = torch.cat([sd[k], torch.zeros(padded - rows, *sd[k].shape[1:], dtype=sd[k].dtype)])
    return out


def _with_nan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    t = sd[NAN_KEY].clone()
    t[0, 0] = float("nan")
    return {**sd, NAN_KEY: t}


def _training_state(hf: Path) -> dict:
    """Optimizer (one AdamW step), lr scheduler and train-state entries as a trainer saves them."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.arange(16).view(1, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {
        "optimizer": get_optimizer_state_dict(model, opt),
        "lr_scheduler": {"last_epoch": torch.tensor(1), "base_lrs": [1e-4]},
        "train_state": {"step": torch.tensor(1), "ntokens_seen": torch.tensor(16)},
    }


def rotary_interleaved_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    """The tensors whose output channels are query or key channels: projections, their biases, q/k norms."""
    return [k for k in sd if any(f"self_attn.{n}." in k for n in ("q_proj", "k_proj", "q_norm", "k_norm"))]


def _rotary_interleaved(sd: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """Query and key channels reordered from the rotate-half layout (HF: channel i pairs with i + d/2) to the
    interleaved one (Meta's original: 2i with 2i + 1): a converter that skips or doubles the permutation
    between the two. q.k is unchanged where the rotation is the identity (distance 0) and wrong from distance
    1 on, so the first position is exact and every later one is off."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # 0, d/2, 1, d/2+1, ...
    out = dict(sd)
    for k in rotary_interleaved_keys(sd):
        heads = sd[k].shape[0] // head_dim
        order = (torch.arange(heads)[:, None] * head_dim + within).flatten()
        out[k] = sd[k][order].contiguous()
    return out


# case -> (how to change the healthy state dict, copy the healthy manifest?)
EDITS: dict[str, tuple[Callable[[dict], dict], bool]] = {
    "dropped_key": (lambda sd: {k: v for k, v in sd.items() if k != DROPPED}, True),
    "nested": (lambda sd: {"model." + k: v for k, v in sd.items()}, False),
    "orig_mod": (lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}, False),
    "vocab_padded": (_pad_vocab, False),
    "swapped_layers": (swapped, True),
    "transposed": (lambda sd: {**sd, TRANSPOSED: sd[TRANSPOSED].t().contiguous()}, True),
    "zeroed_mlp": (
        lambda sd: {k: (torch.zeros_like(v) if k.startswith(ZEROED_MLP) else v) for k, v in sd.items()},
        True,
    ),
    "nan": (_with_nan, True),
}


class Catalogue:
    """Builds each (architecture, case) checkpoint once per session, on first use."""

    def __init__(self, hf_models: dict[str, Path], tied_model: Path, root: Path) -> None:
        self.hf = {**hf_models, "qwen2_tied": tied_model}
        self.root = root
        self._built: dict[tuple[str, str], Path] = {}

    def __call__(self, arch: str, case: str = "healthy") -> Path:
        if (arch, case) not in self._built:
            out = self.root / arch / case
            out.parent.mkdir(parents=True, exist_ok=True)
            self._built[(arch, case)] = self._build(arch, case, out)
        return self._built[(arch, case)]

    def _build(self, arch: str, case: str, out: Path) -> Path:
        if case == "healthy":
            return convert(self.hf[arch], out)
        if case == "bf16":
            return convert(self.hf[arch], out, dtype="bfloat16")
        healthy = self(arch)
        sd = load_all(healthy)
        if case in EDITS:
            edit, keep_manifest = EDITS[case]
            return save_dcp(edit(sd), out, healthy if keep_manifest else None)
        if case == "foreign_manifest":
            other = "llama" if arch != "llama" else "olmo2"
            return save_dcp(sd, out, self(other))
        if case == "full_titan03":  # torchtitan >= 0.2: flat model keys beside the training state
            return save_dcp({**sd, **_training_state(self.hf[arch])}, out)
        if case == "full_titan01":  # torchtitan 0.1: {"model": ..., "optimizer": ...} unflattened
            return save_dcp({"model": sd, **_training_state(self.hf[arch])}, out)
        if case == "rotary_interleaved":
            config = json.loads((self.hf[arch] / "config.json").read_text())
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            return save_dcp(_rotary_interleaved(sd, head_dim), out, healthy)
        if case == "tied_head_dropped":
            return save_dcp({k: v for k, v in sd.items() if k != "lm_head.weight"}, out)
        raise KeyError(case)


@pytest.fixture(scope="session")
def catalogue(hf_models, tied_model, tmp_path_factory) -> Catalogue:
    return Catalogue(hf_models, tied_model, tmp_path_factory.mktemp("catalogue"))


@pytest.fixture
def diagnose_json(capsys) -> Callable[..., tuple[int, dict]]:
    """Run ``flame-ext diagnose ... --json`` in this process through the real CLI; (exit code, report)."""
    from flame_ext.cli import main

    def run(*args: str) -> tuple[int, dict]:
        capsys.readouterr()
        with one_thread():
            code = main(["diagnose", *map(str, args), "--json"])
        out = capsys.readouterr().out
        return code, report_json(out)

    return run


def kinds(report: dict, severity: str | None = None) -> set[str]:
    return {p["kind"] for p in report["problems"] if severity is None or p["severity"] == severity}


def problems_of(report: dict, kind: str) -> list[dict]:
    return [p for p in report["problems"] if p["kind"] == kind]
