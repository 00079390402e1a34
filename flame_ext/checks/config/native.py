"""A torchtitan model config against the HF config of the weights converted for it (config parity).

A torchtitan model is built from its own config (0.3: ``<Model>.Config`` of a flavor; 0.1: ``ModelArgs``),
not from the HF ``config.json``. The two can disagree while every key and shape still matches: torchtitan
#3772 trained on a rope theta silently reset from 1e6 to 10000. So conversion reads the torchtitan config
in HF's field names (``native_fields``) and compares each field the HF config has (``native_config_problems``):
dims, heads, kv heads, head dim, vocabulary, layers, FFN size, rope theta and scaling, norm eps, tied
embeddings, attention bias, low-rank attention sizes, and for MoE the experts, top-k, expert size and routing.
Some of these an HF model does not read from its config but fixes in its code (transformers' deepseek_v3
always scores experts with a sigmoid, qwen3_moe with a softmax and no shared experts): those are compared as
the fixed value (``HF_FIXED``), so a torchtitan config HF cannot express is refused too.

A disagreement is an error; ``--allow-config-mismatch FIELD`` (repeatable) makes that field's a warning,
for a deliberate change (a longer-context rope, say). The torchtitan config is read by its attributes only:
this module imports no torchtitan, so it reads a 0.3 config and a 0.1 ``ModelArgs`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flame_ext.checks.config.normalize import config_class, normalized_config, same_value
from flame_ext.errors import InputError
from flame_ext.report import Problem

__all__ = [
    "NATIVE_FIELDS",
    "HF_FIXED",
    "native_fields",
    "native_config_problems",
    "check_allowed_fields",
    "refuse_config_mismatch",
    "hf_config_for",
]

# The fields compared, in HF's names. A torchtitan value is compared with the first of a field's HF
# spellings the HF config has (the expert count is ``num_experts``, ``num_local_experts`` or
# ``n_routed_experts`` depending on the model type); a field the HF config lacks is not compared.
NATIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size",),
    "num_hidden_layers": ("num_hidden_layers",),
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size",),
    "rms_norm_eps": ("rms_norm_eps",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "attention_bias": ("attention_bias",),
    "rope_theta": ("rope_theta",),
    "rope_type": ("rope_type",),
    "rope_scaling.factor": ("rope_scaling.factor",),
    "rope_scaling.low_freq_factor": ("rope_scaling.low_freq_factor",),
    "rope_scaling.high_freq_factor": ("rope_scaling.high_freq_factor",),
    "rope_scaling.original_max_position_embeddings": ("rope_scaling.original_max_position_embeddings",),
    "rope_scaling.beta_fast": ("rope_scaling.beta_fast",),
    "rope_scaling.beta_slow": ("rope_scaling.beta_slow",),
    "rope_scaling.mscale_all_dim": ("rope_scaling.mscale_all_dim",),
    "rope_scaling.truncate": ("rope_scaling.truncate",),
    "rope_scaling.attention_factor": ("rope_scaling.attention_factor",),
    "rope_interleave": ("rope_interleave",),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "n_shared_experts": ("n_shared_experts",),
    "first_k_dense_replace": ("first_k_dense_replace",),
    "mlp_only_layers": ("mlp_only_layers",),
    "norm_topk_prob": ("norm_topk_prob",),
    "routed_scaling_factor": ("routed_scaling_factor",),
    "n_group": ("n_group",),
    "topk_group": ("topk_group",),
    "scoring_func": ("scoring_func",),
}

# torchtitan's rope scaling names, as HF's rope_type.
_ROPE_TYPES = {"none": "default", "llama": "llama3", "yarn": "yarn"}

# Spellings of "none" that mean the same model: no low-rank query is rank 0 in torchtitan and None in HF.
# (No expert groups is None in torchtitan and one group of every expert in HF, which reads a null n_group as
# its default of 8 groups: ``_moe_fields`` gives torchtitan's None as 1, written and compared as 1.)
_SAME_AS_NONE = {"q_lora_rank": 0}

# What an HF model type fixes in its code rather than reading from its config, in HF's field names: compared
# like a config field when the config has no such field (transformers' deepseek_v3 router always scores with
# a sigmoid; qwen3_moe's with a softmax, without routed scaling, expert groups or shared experts).
HF_FIXED: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"scoring_func": "sigmoid"},
    "qwen3_moe": {
        "scoring_func": "softmax",
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 0,
    },
}


def _first(items: Iterable[Any], test: Any) -> Any:
    return next((x for x in items if test(x)), None)


def _out_features(linear: Any) -> int | None:
    return getattr(linear, "out_features", None) if linear is not None else None


def _rope_fields(rope: Any, attention: Any) -> dict[str, Any]:
    scaling = getattr(rope, "scaling", "none")
    if scaling == "yarn" and getattr(rope, "rope_factor", 1.0) <= 1.0:
        scaling = "none"  # torchtitan applies YaRN only with a factor above 1
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": _ROPE_TYPES.get(scaling, scaling)}
    if scaling == "llama":
        out["rope_scaling.factor"] = rope.scaling_factor
        out["rope_scaling.low_freq_factor"] = rope.low_freq_factor
        out["rope_scaling.high_freq_factor"] = rope.high_freq_factor
        out["rope_scaling.original_max_position_embeddings"] = rope.original_max_position_embeddings
    elif scaling == "yarn":
        out["rope_scaling.factor"] = rope.rope_factor
        out["rope_scaling.beta_fast"] = rope.beta_fast
        out["rope_scaling.beta_slow"] = rope.beta_slow
        out["rope_scaling.original_max_position_embeddings"] = rope.original_seq_len
        out["rope_scaling.truncate"] = rope.truncate
        if getattr(attention, "mscale", None) is not None:  # DeepSeek folds it into the softmax scale
            out["rope_scaling.mscale_all_dim"] = attention.mscale
            # ... and keeps the rotation itself unscaled, where HF scales cos/sin by an attention factor
            # derived from mscale and mscale_all_dim (1 when they are equal, as in DeepSeek's own configs)
            out["rope_scaling.attention_factor"] = 1.0
    return out


def _moe_fields(layers: list[Any]) -> dict[str, Any]:
    moe_ids = [i for i, layer in enumerate(layers) if getattr(layer, "moe", None) is not None]
    if not moe_ids:
        return {}
    moe = layers[moe_ids[0]].moe
    router = moe.router
    experts = getattr(getattr(moe, "routed_experts", None), "inner_experts", None)
    hidden = getattr(experts, "hidden_dim", None)
    out = {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": router.top_k,
        "moe_intermediate_size": hidden,
        "first_k_dense_replace": moe_ids[0],
        "mlp_only_layers": [i for i in range(len(layers)) if i not in moe_ids],
        "norm_topk_prob": router.route_norm,
        "routed_scaling_factor": router.route_scale,
        # torchtitan without groups routes over all experts: one group, chosen (HF has no "no groups")
        "n_group": router.num_expert_groups or 1,
        "topk_group": router.num_limited_groups if router.num_expert_groups else 1,
        "scoring_func": router.score_func,
    }
    shared = _out_features(getattr(getattr(moe, "shared_experts", None), "w1", None))
    if hidden:
        out["n_shared_experts"] = (shared or 0) // hidden
    return out


def _fields_03(config: Any) -> dict[str, Any]:
    """A torchtitan 0.3 model config: a tree of component configs, one per layer."""
    layers = list(config.layers)
    attention = layers[0].attention
    qkv = getattr(attention, "qkv_linear", None)
    n_heads = attention.n_heads
    out: dict[str, Any] = {
        "hidden_size": config.dim,
        "num_hidden_layers": len(layers),
        "num_attention_heads": n_heads,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm.eps,
        "tie_word_embeddings": bool(getattr(config, "enable_weight_tying", False)),
    }
    if qkv is not None or getattr(attention, "n_kv_heads", None) is not None:  # grouped-query attention
        out["num_key_value_heads"] = (
            getattr(attention, "n_kv_heads", None) or getattr(qkv, "n_kv_heads", None) or n_heads
        )
        head_dim = getattr(attention, "head_dim", None) or getattr(qkv, "head_dim", None)
        out["head_dim"] = head_dim or config.dim // n_heads
        projection = getattr(qkv, "wqkv", None) or getattr(qkv, "wq", None)
        out["attention_bias"] = bool(getattr(projection, "bias", False))
    if getattr(attention, "kv_lora_rank", None) is not None:  # multi-head latent attention (DeepSeek)
        out["num_key_value_heads"] = n_heads
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            out[name] = getattr(attention, name)
        # Its rotary embedding rotates adjacent pairs and its adapter keeps HF's rope rows as they are: the HF
        # weights must be in DeepSeek's interleaved layout.
        out["rope_interleave"] = True
    if getattr(attention, "rope", None) is not None:
        out.update(_rope_fields(attention.rope, attention))
    dense = _first(layers, lambda layer: getattr(layer, "feed_forward", None) is not None)
    if dense is not None:
        out["intermediate_size"] = _out_features(dense.feed_forward.w1)
    out.update(_moe_fields(layers))
    return out


def _fields_01(args: Any) -> dict[str, Any]:
    """A torchtitan 0.1 ``ModelArgs`` (llama3): flat fields, the FFN size derived as its FeedForward does."""
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
    out = {
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": args.dim // args.n_heads,
        "intermediate_size": hidden,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_type": "default",  # 0.1's llama3 rotary embedding has no scaling
        "tie_word_embeddings": False,
    }
    if args.vocab_size > 0:  # -1: set later from the tokenizer
        out["vocab_size"] = args.vocab_size
    return out


def native_fields(model_config: Any) -> dict[str, Any]:
    """The torchtitan model config in HF's field names (the keys of ``NATIVE_FIELDS``); fields the config
    does not have are left out."""
    if hasattr(model_config, "layers"):
        fields = _fields_03(model_config)
    else:
        fields = _fields_01(model_config)
    return {k: v for k, v in fields.items() if v is not None}


def _comparable(name: str, value: Any) -> Any:
    return _SAME_AS_NONE[name] if value is None and name in _SAME_AS_NONE else value


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _hf_effective(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` (normalized) with what its model computes but does not spell out: the values its model type fixes
    (``HF_FIXED``) and YaRN's attention factor, which transformers derives when the config has none (from
    mscale over mscale_all_dim when both are set, else from the factor alone)."""
    out = {**HF_FIXED.get(str(hf.get("model_type")), {}), **hf}
    if out.get("rope_type") == "yarn" and out.get("rope_scaling.attention_factor") is None:
        factor = out.get("rope_scaling.factor") or (
            out.get("max_position_embeddings", 0) / out.get("rope_scaling.original_max_position_embeddings", 1)
        )
        mscale, all_dim = out.get("rope_scaling.mscale"), out.get("rope_scaling.mscale_all_dim")
        out["rope_scaling.attention_factor"] = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim) if mscale and all_dim else _yarn_mscale(factor)
        )
    return out


def check_allowed_fields(allow: Iterable[str]) -> frozenset[str]:
    """The ``--allow-config-mismatch`` fields, each one the check compares; one line naming them otherwise."""
    allow = frozenset(allow)
    unknown = sorted(allow - set(NATIVE_FIELDS))
    if unknown:
        raise InputError(
            f"--allow-config-mismatch {unknown[0]}: not a field the config check compares; "
            f"choose from {', '.join(NATIVE_FIELDS)}"
        )
    return allow


def native_config_problems(
    model_config: Any,
    hf_config: dict[str, Any],
    *,
    native_name: str,
    hf_name: str,
    allow: Iterable[str] = (),
) -> list[Problem]:
    """One ``config_mismatch`` problem per field the torchtitan config and the HF config disagree on, naming
    both values: an error, or a warning for a field in ``allow``. ``hf_config`` is the config.json as read;
    its transformers class fills in the defaults, as the HF model would see them."""
    allow = check_allowed_fields(allow)
    native = native_fields(model_config)
    read = normalized_config(hf_config, what=hf_name)
    hf = _hf_effective(read)
    if hf.get("head_dim") is None and hf.get("num_attention_heads"):  # what HF models derive when it is unset
        hf["head_dim"] = hf.get("hidden_size", 0) // hf["num_attention_heads"]
    problems = []
    for name, spellings in NATIVE_FIELDS.items():
        hf_field = _first(spellings, lambda s: s in hf)
        if name not in native or hf_field is None:
            continue
        ours, theirs = _comparable(name, native[name]), _comparable(name, hf[hf_field])
        if same_value(ours, theirs):
            continue
        allowed = name in allow
        if hf_field in read:
            theirs_said = f"the HF config {hf_name} has {hf[hf_field]!r}"
        elif hf_field in HF_FIXED.get(str(read.get("model_type")), {}):
            theirs_said = f"transformers' {read.get('model_type')} always uses {hf[hf_field]!r} (not a config field)"
        else:
            theirs_said = f"the HF config {hf_name} implies {hf[hf_field]!r}"
        problems.append(
            Problem(
                "config_mismatch",
                "warning" if allowed else "error",
                hf_field,
                f"{native_name} has {native[name]!r}, {theirs_said}",
                "allowed by --allow-config-mismatch: the model trains with the torchtitan value"
                if allowed
                else f"the torchtitan model computes something else than the HF model these weights come from; "
                f"set the torchtitan config to {hf[hf_field]!r}, or pass --allow-config-mismatch {name} "
                "if the change is deliberate",
            )
        )
    return problems


def refuse_config_mismatch(problems: Iterable[Problem]) -> None:
    """Raise one ``InputError`` whose message has one line per disagreement (each naming both values and the
    fix); nothing when every problem is allowed (a warning)."""
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise InputError(
            "\n".join(f"config mismatch: {p.key}: {p.detail}; {p.hint.split('; ', 1)[-1]}" for p in errors)
        )


def hf_config_for(model_config: Any, model_type: str) -> dict[str, Any]:
    """The HF ``config.json`` (as a dict) of the model a torchtitan config describes: every compared field under
    the spelling the HF config class of ``model_type`` uses, rope settings as ``rope_scaling``. What passes
    ``native_config_problems`` against the same torchtitan config (tests, and HF folders made from a native
    checkpoint)."""
    cls = config_class(model_type)
    if cls is None:
        raise InputError(f"model_type {model_type!r} is not known to the installed transformers")
    # A field is written under the spelling the class writes, else the first it reads (an alias included).
    default = cls()
    written = set(default.to_dict())
    fields = native_fields(model_config)
    out: dict[str, Any] = {"model_type": model_type}
    rope: dict[str, Any] = {}
    for name, spellings in NATIVE_FIELDS.items():
        if name not in fields:
            continue
        value = fields[name]
        if name in _SAME_AS_NONE and value == _SAME_AS_NONE[name]:
            value = None
        if name == "rope_theta":  # top level: read there by every transformers version
            out[name] = value
            continue
        if name.startswith("rope_scaling.") or name == "rope_type":
            rope[name.removeprefix("rope_scaling.")] = value
            continue
        target = _first(spellings, lambda s: s in written) or _first(spellings, lambda s: hasattr(default, s))
        if target is None and name == "head_dim":
            target = name  # optional in some classes (Qwen3-MoE): absent, HF derives hidden_size / heads
        if target is not None:
            out[target] = value
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    layers = getattr(model_config, "layers", None)
    max_len = getattr(getattr(layers[0].attention, "rope", None), "max_seq_len", None) if layers else None
    if max_len:
        out["max_position_embeddings"] = max_len
    return out
