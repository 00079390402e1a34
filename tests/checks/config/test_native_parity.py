"""Config parity: torchtitan's own model configs (the installed torchtitan's debug flavors) against tiny HF
configs of the same model. A matching pair passes; a rope theta (torchtitan #3772: 1e6 silently 10000) or a
head count that differs is refused at one line per field, naming both values; ``--allow-config-mismatch``
makes it a warning."""

from __future__ import annotations

import pytest
from support.titan_hosts import titan_generation

from flame_ext.checks.config.native import (
    check_allowed_fields,
    hf_config_for,
    native_config_problems,
    native_fields,
    refuse_config_mismatch,
)
from flame_ext.errors import InputError

titan03 = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3.x model configs")
titan01 = pytest.mark.skipif(titan_generation() != "0.1", reason="torchtitan 0.1.x ModelArgs")

LLAMA_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_llama(**over) -> dict:
    """The HF config of torchtitan's llama3 debugmodel."""
    config = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 2048,
        "intermediate_size": 768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": dict(LLAMA_ROPE),
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    }
    return {**config, **over}


def hf_qwen3(**over) -> dict:
    """The HF config of torchtitan's qwen3 debugmodel."""
    config = {
        "model_type": "qwen3",
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 2048,
        "intermediate_size": 3072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    return {**config, **over}


def hf_deepseek_v3(**over) -> dict:
    """The HF config of torchtitan's deepseek_v3 debugmodel with a sigmoid router (``sigmoid_routed``: HF's
    deepseek_v3 has no other): MoE with a dense first layer, MLA, YaRN with the rotation unscaled."""
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 2048,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 40.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.7,
            "mscale_all_dim": 0.7,
            "original_max_position_embeddings": 4096,
        },
        "max_position_embeddings": 16384,
        "tie_word_embeddings": False,
    }
    return {**config, **over}


def torchtitan_config(module: str, flavor: str = "debugmodel"):
    import importlib

    config = importlib.import_module(f"torchtitan.models.{module}").model_registry(flavor).model
    return sigmoid_routed(config) if module == "deepseek_v3" else config


def routers(config) -> list:
    return [layer.moe.router for layer in config.layers if getattr(layer, "moe", None) is not None]


def sigmoid_routed(config):
    """torchtitan's deepseek_v3 debugmodel scores experts with a softmax; DeepSeek-V3 (and HF) with a sigmoid."""
    for router in routers(config):
        router.score_func = "sigmoid"
    return config


def problems(module: str, hf: dict, flavor: str = "debugmodel", config=None, **kw):
    config = config if config is not None else torchtitan_config(module, flavor)
    return native_config_problems(config, hf, native_name=f"torchtitan:{module}", hf_name="hf/config.json", **kw)


@titan03
@pytest.mark.parametrize(
    ("module", "hf"), [("llama3", hf_llama()), ("qwen3", hf_qwen3()), ("deepseek_v3", hf_deepseek_v3())]
)
def test_a_matching_pair_passes(module, hf):
    assert problems(module, hf) == []


@titan03
@pytest.mark.parametrize(
    ("module", "flavor", "model_type"),
    [
        ("llama3", "debugmodel", "llama"),
        ("qwen3", "debugmodel", "qwen3"),
        ("qwen3", "debugmodel_moe", "qwen3_moe"),
        ("deepseek_v3", "debugmodel", "deepseek_v3"),
        ("gpt_oss", "debugmodel", "gpt_oss"),
    ],
)
def test_the_hf_config_written_for_a_torchtitan_config_matches_it(module, flavor, model_type):
    """What HF folders made from a native model carry: read back by transformers' config class, it agrees with
    the torchtitan config on every compared field (experts and top-k included)."""
    config = torchtitan_config(module, flavor)
    hf = hf_config_for(config, model_type)
    assert hf["model_type"] == model_type and hf["rope_theta"] == native_fields(config)["rope_theta"]
    assert problems(module, hf, config=config) == []


@titan03
def test_a_score_function_hf_does_not_have_is_refused_naming_both_values():
    """torchtitan's own deepseek_v3 debugmodel routes with a softmax: no HF deepseek_v3 config can say so."""
    import importlib

    config = importlib.import_module("torchtitan.models.deepseek_v3").model_registry("debugmodel").model
    (problem,) = problems("deepseek_v3", hf_deepseek_v3(), config=config)
    assert problem.key == "scoring_func" and problem.severity == "error"
    assert problem.detail == (
        "torchtitan:deepseek_v3 has 'softmax', transformers' deepseek_v3 always uses 'sigmoid' (not a config field)"
    )
    with pytest.raises(InputError) as info:
        refuse_config_mismatch([problem])
    (line,) = str(info.value).splitlines()
    assert "--allow-config-mismatch scoring_func" in line
    (allowed,) = problems("deepseek_v3", hf_deepseek_v3(), config=config, allow=["scoring_func"])
    assert allowed.severity == "warning"


@titan03
def test_no_expert_groups_is_written_as_one_group_of_every_expert():
    """torchtitan's router without groups; HF reads a missing or null n_group as its default, 8 groups."""
    config = torchtitan_config("deepseek_v3")
    assert {(r.num_expert_groups, r.num_limited_groups) for r in routers(config)} == {(None, None)}
    hf = hf_config_for(config, "deepseek_v3")
    assert (hf["n_group"], hf["topk_group"]) == (1, 1)
    assert problems("deepseek_v3", hf_deepseek_v3(n_group=None, topk_group=None)) != []
    found = problems("deepseek_v3", {k: v for k, v in hf_deepseek_v3().items() if k not in ("n_group", "topk_group")})
    assert {(p.key, p.detail) for p in found} == {
        ("n_group", "torchtitan:deepseek_v3 has 1, the HF config hf/config.json has 8"),
        ("topk_group", "torchtitan:deepseek_v3 has 1, the HF config hf/config.json has 4"),
    }


@titan03
def test_expert_groups_are_written_and_compared():
    config = torchtitan_config("deepseek_v3")
    for router in routers(config):
        router.num_expert_groups, router.num_limited_groups = 4, 2
    hf = hf_config_for(config, "deepseek_v3")
    assert (hf["n_group"], hf["topk_group"]) == (4, 2)
    assert problems("deepseek_v3", hf, config=config) == []
    (problem,) = problems("deepseek_v3", {**hf, "topk_group": 1}, config=config)
    assert problem.key == "topk_group" and "has 2" in problem.detail and "has 1" in problem.detail


@titan03
def test_routing_scale_norm_and_dense_layers_are_compared():
    found = problems(
        "deepseek_v3", hf_deepseek_v3(routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=2)
    )
    assert {p.key for p in found} == {"routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace"}


@titan03
def test_a_scaled_rotation_and_a_rotate_half_layout_are_refused():
    """torchtitan's DeepSeek attention folds YaRN's mscale into the softmax scale only; HF also scales cos/sin
    unless mscale equals mscale_all_dim. Its rope rotates adjacent pairs: HF's rope_interleave."""
    rope = {**hf_deepseek_v3()["rope_scaling"], "mscale": 1.0}
    found = problems("deepseek_v3", hf_deepseek_v3(rope_scaling=rope, rope_interleave=False))
    assert {p.key for p in found} == {"rope_scaling.attention_factor", "rope_interleave"}
    (factor,) = [p for p in found if p.key == "rope_scaling.attention_factor"]
    assert factor.detail.startswith("torchtitan:deepseek_v3 has 1.0, the HF config hf/config.json implies 1.08")


@titan03
def test_qwen3_moe_fixed_routing_is_compared():
    """HF's qwen3_moe has no shared experts, groups or routed scaling: a torchtitan config with them is refused."""
    config = torchtitan_config("qwen3", "debugmodel_moe")
    hf = hf_config_for(config, "qwen3_moe")
    assert "n_group" not in hf and "scoring_func" not in hf
    for router in routers(config):
        router.route_scale = 2.0
    (problem,) = problems("qwen3", hf, config=config)
    assert problem.key == "routed_scaling_factor" and "always uses 1.0" in problem.detail


@titan03
def test_every_listed_field_of_llama3_is_read():
    fields = native_fields(torchtitan_config("llama3"))
    assert fields["num_attention_heads"] == 16 and fields["rope_theta"] == 500000
    assert fields["rope_type"] == "llama3" and fields["rope_scaling.factor"] == 8.0


@titan03
def test_rope_theta_reset_to_10000_is_refused_naming_both_values():
    """torchtitan #3772: the HF model has rope_theta 1e6, the torchtitan config 10000."""
    config = torchtitan_config("qwen3")
    for layer in config.layers:
        layer.attention.rope.theta = 10000.0
    (problem,) = problems("qwen3", hf_qwen3(), config=config)
    assert problem.kind == "config_mismatch" and problem.severity == "error" and problem.key == "rope_theta"
    assert problem.detail == "torchtitan:qwen3 has 10000.0, the HF config hf/config.json has 1000000.0"
    with pytest.raises(InputError) as info:
        refuse_config_mismatch([problem])
    (line,) = str(info.value).splitlines()
    assert "rope_theta" in line and "10000.0" in line and "1000000.0" in line
    assert "--allow-config-mismatch rope_theta" in line


@titan03
def test_a_heads_mismatch_is_refused_naming_both_values():
    found = problems("llama3", hf_llama(num_attention_heads=8, num_key_value_heads=8))
    assert {(p.key, p.detail) for p in found} == {
        ("num_attention_heads", "torchtitan:llama3 has 16, the HF config hf/config.json has 8"),
        ("num_key_value_heads", "torchtitan:llama3 has 16, the HF config hf/config.json has 8"),
        ("head_dim", "torchtitan:llama3 has 16, the HF config hf/config.json has 32"),
    }
    with pytest.raises(InputError) as info:
        refuse_config_mismatch(found)
    assert len(str(info.value).splitlines()) == 3


@titan03
def test_rope_scaling_and_tie_are_compared():
    found = problems("llama3", hf_llama(rope_scaling=None, tie_word_embeddings=True))
    assert {p.key: p.detail.split(" has ")[1].split(",")[0] for p in found} == {
        "rope_type": "'llama3'",
        "tie_word_embeddings": "False",
    }


@titan03
def test_moe_experts_and_top_k_are_compared():
    found = problems("deepseek_v3", hf_deepseek_v3(n_routed_experts=16, num_experts_per_tok=2))
    assert {(p.key, p.detail) for p in found} == {
        ("n_routed_experts", "torchtitan:deepseek_v3 has 8, the HF config hf/config.json has 16"),
        ("num_experts_per_tok", "torchtitan:deepseek_v3 has 3, the HF config hf/config.json has 2"),
    }


@titan03
def test_an_allowed_field_is_a_warning_and_passes():
    config = torchtitan_config("qwen3")
    for layer in config.layers:
        layer.attention.rope.theta = 10000.0
    (problem,) = problems("qwen3", hf_qwen3(), config=config, allow=["rope_theta"])
    assert problem.severity == "warning"
    refuse_config_mismatch([problem])  # nothing raised


def test_an_unknown_allowed_field_is_one_line_naming_it():
    with pytest.raises(InputError, match=r"--allow-config-mismatch rope_thetta: not a field"):
        check_allowed_fields(["rope_thetta"])


@titan01
def test_torchtitan01_model_args_are_read_and_compared():
    from torchtitan.models.llama3 import llama3_configs

    args = llama3_configs["debugmodel"]
    args.vocab_size = 2048
    fields = native_fields(args)
    hf = hf_llama(
        num_hidden_layers=fields["num_hidden_layers"],
        intermediate_size=fields["intermediate_size"],
        rope_scaling=None,
        rope_theta=args.rope_theta,
    )
    assert problems("llama3", hf, config=args) == []
    (problem,) = problems("llama3", {**hf, "rope_theta": 1000000.0}, config=args)
    assert problem.key == "rope_theta" and "1000000.0" in problem.detail
