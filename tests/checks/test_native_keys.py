"""The naming of model keys (HF's or torchtitan's own) and the one layout problem when they meet, on key
tables only: the real loads are in tests/titan/test_native_layout.py."""

from __future__ import annotations

from flame_ext.checks.keys import compare_specs
from flame_ext.checks.native_keys import key_naming, naming_problem
from flame_ext.io.specs import TensorSpec

HF = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{name}.weight"
    for i in range(2)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "input_layernorm")
]
NATIVE = ["tok_embeddings.weight", "norm.weight", "lm_head.weight"] + [
    f"layers.{i}.{name}.weight"
    for i in range(2)
    for name in ("attention.qkv_linear.wq", "attention.qkv_linear.wk", "feed_forward.w1", "attention_norm")
]


def specs(keys: list[str]) -> dict[str, TensorSpec]:
    return {k: TensorSpec((4, 4), "float32") for k in keys}


def test_each_naming_is_recognised_and_other_families_are_not():
    assert key_naming(HF) == "hf" and key_naming(NATIVE) == "torchtitan"
    assert key_naming(["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"]) is None
    assert naming_problem(HF, HF) is None and naming_problem(NATIVE, NATIVE) is None


def test_hf_names_for_a_native_model_are_one_layout_problem_with_the_command():
    result = compare_specs(specs(NATIVE), specs(HF), native_module="llama3")
    (problem,) = result.problems
    assert problem.kind == "layout" and problem.severity == "error"
    assert "torchtitan's own key names (11 keys, e.g. layers.0.attention.qkv_linear.wk.weight)" in problem.detail
    assert "Hugging Face names (11 keys, e.g. model.embed_tokens.weight)" in problem.detail
    assert "flame-ext convert --model HF_MODEL --checkpoint OUT --layout torchtitan:llama3" in problem.hint
    # lm_head.weight is in both namings: the other 10 are missing and 10 unexpected, counted, not listed
    assert result.counts["missing"] == 10 and result.counts["unexpected"] == 10


def test_native_names_for_an_hf_model_name_the_reverse_fix():
    (problem,) = compare_specs(specs(HF), specs(NATIVE)).problems
    assert problem.kind == "layout" and "the checkpoint has torchtitan's own names" in problem.detail
    assert "convert without --layout" in problem.hint and "flame-ext to-hf" in problem.hint


def test_without_the_module_the_command_says_where_it_goes():
    (problem,) = compare_specs(specs(NATIVE), specs(HF)).problems
    assert "--layout torchtitan:<module>" in problem.hint


def test_a_few_missing_keys_stay_listed_one_by_one():
    """Same naming, two keys gone: the ordinary missing-key problems, no layout problem."""
    result = compare_specs(specs(NATIVE), specs(NATIVE[:-2]))
    assert sorted(p.kind for p in result.problems) == ["missing_key", "missing_key"]
