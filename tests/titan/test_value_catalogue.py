"""The guard's value check against a catalogue of one-tensor (and one-pair) damages, on four architectures.

Each case converts a small model with `flame-ext convert` (fingerprints recorded), changes the DCP after
conversion the way a broken tool or disk would, keeps `flame_ext.json`, and loads it through the installed
torchtitan's real `ValidatingCheckpointManager`. Every damage must stop the load with `value_mismatch`
naming the damaged key and saying what happened; the untouched, bf16-into-fp32 and future-predictor
checkpoints must pass.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _models import hf_like_trainer
from support.titan_hosts import build_manager, titan_generation

sys.path.insert(0, str(Path(__file__).parents[1]))
from diagnose.conftest import convert, load_all, one_thread, save_dcp  # noqa: E402

from flame_ext.errors import InitialLoadValidationError  # noqa: E402

# slow: ~60 guarded loads through the real checkpoint managers; make test-fast leaves it out, make test runs it.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"),
]

ARCHS = ("olmo2", "llama", "qwen2_tied", "qwen3")
L0, L1 = "model.layers.0.", "model.layers.1."


def _rows_swapped(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out[[0, 5]] = t[[5, 0]]
    return out


def _noise(t: torch.Tensor, rel: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (t.float() + rel * t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype)


def _ulp_noise(t: torch.Tensor) -> torch.Tensor:
    """Every bf16 value one step up or down: noise exactly at the stored dtype's resolution."""
    assert t.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    step = torch.randint(0, 2, t.shape, generator=g, dtype=torch.int16) * 2 - 1
    return (t.view(torch.int16) + step).view(torch.bfloat16)


def _rotary_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    order = (torch.arange(t.shape[0] // head_dim)[:, None] * head_dim + within).flatten()
    return t[order].contiguous()


def _swap(sd: dict, a: str, b: str) -> dict:
    return {**sd, a: sd[b], b: sd[a]}


# name -> (edit(state, head_dim) -> state, {damaged key: phrase the "what happened" must contain}, base)
Edit = Callable[[dict, int], dict]
DOWN = L1 + "mlp.down_proj.weight"
O0, Q0, K0 = L0 + "self_attn.o_proj.weight", L0 + "self_attn.q_proj.weight", L0 + "self_attn.k_proj.weight"
EMB, UP, GATE, NORM = (
    "model.embed_tokens.weight",
    L1 + "mlp.up_proj.weight",
    L0 + "mlp.gate_proj.weight",
    "model.norm.weight",
)
CASES: dict[str, tuple[Edit, dict[str, str], str]] = {
    "zeroed down_proj": (lambda sd, d: {**sd, DOWN: torch.zeros_like(sd[DOWN])}, {DOWN: "only zeros"}, "fp32"),
    "o_proj scaled 0.9": (lambda sd, d: {**sd, O0: sd[O0] * 0.9}, {O0: "scaled by 0.9"}, "fp32"),
    "two q_proj rows swapped": (
        lambda sd, d: {**sd, Q0: _rows_swapped(sd[Q0])},
        {Q0: "moved within their columns"},
        "fp32",
    ),
    "1e-3 std noise on the embedding": (
        lambda sd, d: {**sd, EMB: _noise(sd[EMB], 1e-3)},
        {EMB: "small amounts"},
        "fp32",
    ),
    "layers 0 and 1 swapped": (
        lambda sd, d: {
            **sd,
            **{
                k.replace(L0, L1) if k.startswith(L0) else k.replace(L1, L0): v
                for k, v in sd.items()
                if k.startswith((L0, L1))
            },
        },
        # One cause, one problem: the two layers named, with the count (checks' fold_swaps).
        {None: f"{L0[:-1]} and {L1[:-1]} are swapped: "},
        "fp32",
    ),
    "q_proj and o_proj swapped": (
        lambda sd, d: _swap(sd, Q0, O0),
        {Q0: f"values expected for {O0}", O0: f"values expected for {Q0}"},
        "fp32",
    ),
    "o_proj transposed": (lambda sd, d: {**sd, O0: sd[O0].t().contiguous()}, {O0: "transposed"}, "fp32"),
    "q/k rotary layout interleaved": (
        lambda sd, d: {**sd, Q0: _rotary_interleaved(sd[Q0], d), K0: _rotary_interleaved(sd[K0], d)},
        {Q0: "moved within their columns", K0: "moved within their columns"},
        "fp32",
    ),
    "one gate_proj row permuted": (
        lambda sd, d: {**sd, GATE: torch.cat([sd[GATE][:3], sd[GATE][3:4].roll(7, dims=1), sd[GATE][4:]])},
        {GATE: "moved within their rows"},
        "fp32",
    ),
    "k_proj columns permuted": (
        lambda sd, d: {
            **sd,
            K0: sd[K0][:, torch.randperm(sd[K0].shape[1], generator=torch.Generator().manual_seed(2))],
        },
        {K0: "moved within their rows"},
        "fp32",
    ),
    "final norm scaled 1.5": (lambda sd, d: {**sd, NORM: sd[NORM] * 1.5}, {NORM: "scaled by 1.5"}, "fp32"),
    "up_proj replaced by other values": (
        lambda sd, d: {**sd, UP: torch.randn(sd[UP].shape, generator=torch.Generator().manual_seed(3)) * sd[UP].std()},
        {UP: "different values"},
        "fp32",
    ),
    "a NaN in q_proj": (
        lambda sd, d: {**sd, Q0: sd[Q0].index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan))},
        {Q0: "NaN or inf"},
        "fp32",
    ),
    "bf16-resolution noise on k_proj (bf16 checkpoint)": (
        lambda sd, d: {**sd, K0: _ulp_noise(sd[K0])},
        {K0: "bfloat16 rounding"},
        "bf16",
    ),
}


def _qwen3(out: Path, tokenizer_from: Path) -> Path:
    """An untrained tiny Qwen3 (q/k norms), its norm weights drawn at random so that no two tensors are equal."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="module")
def sources(hf_models, tied_model, tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("value-catalogue")
    return {
        "olmo2": hf_models["olmo2"],
        "llama": hf_models["llama"],
        "qwen2_tied": tied_model,
        "qwen3": _qwen3(root / "qwen3", tiny_model),
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> Callable[[str, str], Path]:
    root = tmp_path_factory.mktemp("value-catalogue-dcp")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, base: str) -> Path:
        if (arch, base) not in made:
            kw = {"dtype": "bfloat16"} if base == "bf16" else {}
            made[(arch, base)] = convert(sources[arch], root / f"{arch}-{base}", **kw)
        return made[(arch, base)]

    return get


def _load(hf_dir: Path, checkpoint: Path, base: Path):
    model = hf_like_trainer(hf_dir)
    manager = build_manager(model, base, initial_load_path=str(checkpoint), validate_initial_load=True)
    with one_thread():
        return manager, manager.load()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_damage_is_stopped_with_the_key_and_what_happened(arch, case, sources, converted, tmp_path):
    edit, expected, base = CASES[case]
    healthy = converted(arch, base)
    config = json.loads((sources[arch] / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    damaged = save_dcp(edit(load_all(healthy), head_dim), tmp_path / "damaged", manifest_from=healthy)
    with pytest.raises(InitialLoadValidationError) as info:
        _load(sources[arch], damaged, tmp_path / "run")
    values = {p.key: p for p in info.value.report.problems if p.kind == "value_mismatch"}
    for key, phrase in expected.items():
        assert key in values, f"{key} not named; value problems: {sorted(values)}"
        assert values[key].severity == "error"
        assert phrase in values[key].detail, values[key].detail
        if "rounding" in phrase or "noise" in phrase:
            assert "swap" not in values[key].detail and "transpos" not in values[key].detail
    assert info.value.report.loss is not None  # the loss gate ran too, as the second check


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("base", ["fp32", "bf16"])
def test_untouched_and_bf16_into_fp32_parameters_pass(arch, base, sources, converted, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    manager, loaded = _load(sources[arch], converted(arch, base), tmp_path)
    assert loaded and manager.initial_load_report.ok
    assert not [p for p in manager.initial_load_report.problems if p.kind == "value_mismatch"]
    note = next(n for n in manager.initial_load_report.notes if n.startswith("values: "))
    assert " 0 differ" in note and not note.startswith("values: 0 ")
