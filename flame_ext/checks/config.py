"""The model config a trainer builds from, against the HF config the weights were trained with.

flame builds its model from ``--model.config``, not from the checkpoint: a config that differs in a field
that changes the computation (``rope_theta``, a norm epsilon, the head layout, ...) gives a model whose
keys and shapes may all match and which still computes something else. Fields are sorted into three
explicit lists, so what is compared and what is not can be read (and is tested) here:

* ``COMPUTE_FIELDS``: a difference changes what the weights compute -> error;
* ``TRAINING_FIELDS``: a difference changes training (dropout, special-token ids) but not what the
  weights mean -> warning;
* ``IGNORED_FIELDS``: bookkeeping, generation defaults, kernel switches -> not reported.

A differing field in none of the lists is reported as a warning, so a new field is never silently lost.
Both configs are read through the transformers config class of their ``model_type``, so defaults are
filled in and renamed fields (``rope_scaling`` -> ``rope_parameters`` in transformers 5) line up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flame_ext.errors import InputError
from flame_ext.io.hf_config import read_model_config
from flame_ext.io.registry import register_model_type
from flame_ext.report import Problem

__all__ = [
    "COMPUTE_FIELDS",
    "TRAINING_FIELDS",
    "IGNORED_FIELDS",
    "classify",
    "read_config_file",
    "normalized_config",
    "compare_configs",
    "misread_fields",
    "installed_reading_problems",
    "recorded_source_problems",
]

COMPUTE_FIELDS = frozenset(
    {
        # sizes and head layout
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        # activations and norms
        "hidden_act",
        "hidden_activation",
        "activation_function",
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "norm_eps",
        "norm_epsilon",
        "use_qk_norm",
        "qk_layernorm",
        # positional encoding (rope dicts are flattened: see _flatten_rope)
        "rope_theta",
        "rope_type",
        "partial_rotary_factor",
        "rotary_pct",
        "rotary_emb_base",
        "rotary_dim",
        "position_embedding_type",
        # structure
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "bias",
        "qkv_bias",
        "clip_qkv",
        "use_parallel_residual",
        "parallel_attn",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "attention_chunk_size",
        "no_rope_layers",
        # scalings of logits, embeddings and residuals
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "logit_scale",
        "query_pre_attn_scalar",
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
        "scale_emb",
        "dim_model_base",
        "scale_depth",
        # mixture of experts and low-rank attention
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "first_k_dense_replace",
        "n_routed_experts",
        "n_shared_experts",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "topk_method",
        "scoring_func",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_rope_head_dim",
        "v_head_dim",
        "qk_nope_head_dim",
        # flash-linear-attention (fla) models: sizes and head layout of the token mixers
        "num_heads",
        "num_kv_heads",
        "num_v_heads",
        "expand_k",
        "expand_v",
        "expand_ratio",
        "expand",
        "hidden_ratio",
        "value_dim",
        "qk_head_dim",
        "state_size",
        "n_groups",
        "num_slots",
        "num_householder",
        "num_memories",
        "shared_mem",
        "single_kv_proj",
        "capacity",
        "topk",
        "router_type",
        "router_score",
        "conv_size",
        "conv_kernel",
        "conv_bias",
        "use_conv_bias",
        "use_bias",
        "use_short_conv",
        "use_w_shortconv",
        "dt_rank",
        "time_step_rank",
        "gate_low_rank_dim",
        "decay_low_rank_dim",
        "a_low_rank_dim",
        "v_low_rank_dim",
        "proj_low_rank_dim",
        "input_gate_low_rank",
        "is_mimo",
        "mimo_rank",
        # fla: which layers are attention, window and block structure
        "attn",
        "block_type",
        "block_size",
        "block_counts",
        "window_size",
        "moba_chunk_size",
        "moba_topk",
        "num_self_decoder_layers",
        "self_decoder_attn",
        "cross_decoder_attn",
        "ska_attn",
        "attnres_block_size",
        "compressor_hidden_size",
        "compressor_num_heads",
        "compressor_num_layers",
        "dim_fx",
        "max_chunk_size",
        # fla: gates, feature maps, norms and activations inside the token mixers
        "feature_map",
        "norm_feature_map",
        "tie_feature_map_qk",
        "norm_q",
        "norm_k",
        "qk_norm",
        "qk_activation",
        "use_beta",
        "use_gate",
        "use_gk",
        "use_gv",
        "use_output_gate",
        "output_gate_activation",
        "use_output_norm",
        "use_output_correction",
        "use_inner_decay",
        "use_forget_gate",
        "use_low_rank_w",
        "use_lower_bound",
        "use_norm",
        "use_rope",
        "use_scalar_gate",
        "allow_neg_eigval",
        "safe_gate",
        "lower_bound",
        "clamp_min",
        "clamp_max",
        "gate_logit_normalizer",
        "correction_factor",
        "decay_type",
        "bias_rmm",
        "squash_x",
        "squash_eps",
        "lambda_lower_bound",
        "max_cg_step_decoding",
        "attend_current",
        "elementwise_affine",
        "norm_first",
        "norm_bias",
        "norm_before_gate",
        "rmsnorm",
        "is_outproj_norm",
        "k_norm_eps",
        "D_has_hdim",
        "A_floor",
        "dt_limit",
        "rope_fraction",
    }
)

TRAINING_FIELDS = frozenset(
    {
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "embd_pdrop",
        "resid_pdrop",
        "attn_pdrop",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "output_router_logits",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        # Changes the computation only with a scaled rope (see _tier); with the default rope it is a length limit.
        "max_position_embeddings",
        "rope_max_position_embeddings",
        # fla: terms of the training loss and training-time schedules, not what the weights compute
        "use_l2warp",
        "aux_loss_scale",
        "use_layer_wise_balance",
        "add_gumbel_noise",
        "max_cg_step_training",
        "min_train_chunk_size",
        "train_chunk_size_schedule",
    }
)

IGNORED_FIELDS = frozenset(
    {
        # bookkeeping
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "model_type",
        "auto_map",
        "_commit_hash",
        "_attn_implementation",
        "attn_implementation",
        "_attn_implementation_autoset",
        "_experts_implementation",
        "use_bfloat16",
        "initializer_range",
        "initializer_factor",
        # outputs and caching
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "torchscript",
        "use_return_dict",
        "chunk_size_feed_forward",
        "pruned_heads",
        "tf_legacy_loss",
        "num_logits_to_keep",
        # encoder-decoder and task fields of the base config
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "decoder_start_token_id",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        # generation defaults (transformers 4.x keeps them in the model config)
        "bad_words_ids",
        "begin_suppress_tokens",
        "diversity_penalty",
        "do_sample",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_scores",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict_in_generate",
        "suppress_tokens",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        # numerically equivalent implementations (fused kernels, tensor-parallel slicing of the same matmul)
        "pretraining_tp",
        "fuse_cross_entropy",
        "fuse_norm",
        "fuse_swiglu",
        "fuse_linear_cross_entropy",
        # fla: which kernel computes the same function (chunked, fused-recurrent, ...), recomputation and padding
        "attn_mode",
        "chunk_size",
        "checkpoint_level",
        "mom_backend",
        "use_flash_moba",
        "pad_to_multiple_of",
        "residual_in_fp32",  # the residual stream's precision: rounding, as a dtype change is
        "block_residual_in_fp32",
        # fla: initialisation only (the weights come from the checkpoint)
        "rescale_prenorm_residual",
        "A_init_range",
        "conv_init",
        "dt_min",
        "dt_max",
        "dt_init_floor",
        "dt_init_scheme",
        "dt_scale",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "time_step_scale",
        "time_step_init_scheme",
        "a_log_init_lower",
        "log_atk_scale_init",
        "gate_init_bias",
    }
)

_ROPE_DICTS = ("rope_scaling", "rope_parameters")


def classify(name: str, normalized: dict[str, Any] | None = None) -> str:
    """'compute', 'training', 'ignored' or 'unlisted' for a (flattened) config field."""
    if name.startswith("rope_scaling."):
        return "compute"  # every parameter of a scaled rope changes the frequencies
    if (
        name == "max_position_embeddings"
        and normalized is not None
        and normalized.get("rope_type", "default") != "default"
    ):
        return "compute"  # dynamic / yarn / llama3 rope scale frequencies relative to it
    for tier, names in (("compute", COMPUTE_FIELDS), ("training", TRAINING_FIELDS), ("ignored", IGNORED_FIELDS)):
        if name in names:
            return tier
    return "unlisted"


def read_config_file(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A config.json given as a file or as the folder holding it; one clear error otherwise."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise InputError(f"--train-config {path}: no such file or folder")
    if not file.exists():
        raise InputError(f"--train-config {path}: no config.json in this folder")
    data = read_model_config(file, what=f"--train-config {file}")
    return data, file


def _flatten_rope(d: dict[str, Any]) -> dict[str, Any]:
    """One spelling for rope settings across transformers versions: ``rope_theta``, ``rope_type`` at top
    level, every other rope parameter as ``rope_scaling.<name>``."""
    out = {k: v for k, v in d.items() if k not in _ROPE_DICTS}
    for name in _ROPE_DICTS:
        rope = d.get(name)
        if not isinstance(rope, dict):
            continue
        for k, v in rope.items():
            if k == "type":  # the pre-4.45 spelling of rope_type
                k = "rope_type"
            if k in ("rope_theta", "rope_type"):
                out.setdefault(k, v)
            else:
                out[f"rope_scaling.{k}"] = v
    out.setdefault("rope_type", "default")
    return out


def normalized_config(config: dict[str, Any], *, what: str) -> dict[str, Any]:
    """The config as its transformers class reads it (defaults filled in), flattened and JSON-comparable."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    register_model_type(str(model_type), what)
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise InputError(f"{what}: model_type {model_type!r} is not known to the installed transformers") from None
    try:
        obj = cls.from_dict(dict(config))
    except Exception as exc:  # a config class rejects values with many exception types
        raise InputError(f"{what}: transformers cannot read this config ({str(exc).splitlines()[0][:160]})") from exc
    d = obj.to_dict()
    d.update({k: v for k, v in config.items() if k not in d})  # fields the class does not know: compared as written
    return json.loads(json.dumps(_flatten_rope(d), default=str))


_JSON_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _plain(value: Any) -> Any:
    """A config value as plain JSON data: transformers writes a non-finite float as {"__float__": "Infinity"},
    and a config object holds tuples where the file has lists."""
    if isinstance(value, dict) and set(value) == {"__float__"} and value["__float__"] in _JSON_FLOATS:
        return _JSON_FLOATS[value["__float__"]]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def compare_configs(train: dict[str, Any], hf: dict[str, Any], *, train_name: str, hf_name: str) -> list[Problem]:
    """Every differing field that matters, with both values; a config of another architecture is bad input."""
    if train.get("model_type") != hf.get("model_type"):
        raise InputError(
            f"--train-config {train_name}: model_type {train.get('model_type')!r}, but the HF model {hf_name} is "
            f"{hf.get('model_type')!r}; pass the config the trainer builds this model from"
        )
    a = normalized_config(train, what=f"--train-config {train_name}")
    b = normalized_config(hf, what=hf_name)
    problems = []
    for name in sorted(set(a) | set(b)):
        va, vb = a.get(name), b.get(name)
        if _same(va, vb):
            continue
        tier = classify(name, b)
        if tier == "ignored":
            continue
        detail = f"training config {va!r}, HF config {vb!r}"
        if tier == "compute":
            problems.append(
                Problem(
                    "config_mismatch",
                    "error",
                    name,
                    detail,
                    f"the trainer builds a model that computes differently from the one the weights were trained as; "
                    f"set {name} = {vb!r} in the training config (or convert from a model trained with {va!r})",
                )
            )
        elif tier == "training":
            problems.append(
                Problem(
                    "config_mismatch",
                    "warning",
                    name,
                    detail,
                    "changes training (regularisation, special-token ids or length limits), not what the weights "
                    "compute; "
                    "make sure it is deliberate",
                )
            )
        else:
            problems.append(
                Problem(
                    "config_mismatch",
                    "warning",
                    name,
                    detail + " (a field flame-ext does not classify)",
                    "check whether this field changes the computation of the model; if it does, use the HF value",
                )
            )
    return problems


# Set by the config class from other fields (Qwen2 drops sliding_window when use_sliding_window is false;
# layer_types is derived from it): a different exposed value there is the class's bookkeeping, not a misreading.
_DERIVED_BY_CLASS = frozenset({"sliding_window", "max_window_layers", "layer_types"})


def _config_class(model_type: Any) -> Any:
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def _as_read(config_obj: Any) -> dict[str, Any]:
    """What a transformers config object exposes, flattened like the file; a rope dict its class does not take
    (``rope_parameters`` before transformers 5) is dropped: it is stored but no model code reads it."""
    import inspect

    d = config_obj.to_dict()
    taken = set(inspect.signature(type(config_obj).__init__).parameters)
    for name in _ROPE_DICTS:
        if name not in taken:
            d.pop(name, None)
    return json.loads(json.dumps(_flatten_rope(d), default=str))


def _exposed(read: dict[str, Any], name: str) -> Any:
    """``read[name]``, also under the other rope spelling (transformers 5 moves partial_rotary_factor into the
    rope dict)."""
    if name in read:
        return read[name]
    other = name[len("rope_scaling.") :] if name.startswith("rope_scaling.") else f"rope_scaling.{name}"
    return read.get(other)


def misread_fields(stated: dict[str, Any], config_obj: Any) -> list[tuple[str, Any, Any]]:
    """(field, the file's value, the value ``config_obj`` uses) for every compute field the file states whose
    value the config object does not carry: the model built from it computes something else."""
    own = json.loads(json.dumps(_flatten_rope(stated), default=str))
    read = _as_read(config_obj)
    out = []
    for name in sorted(own):
        value = own[name]
        if value is None or name in _DERIVED_BY_CLASS or classify(name, own) != "compute":
            continue
        used = _exposed(read, name)
        if not _same(value, used):
            out.append((name, value, used))
    return out


def installed_reading_problems(
    config: dict[str, Any], *, what: str, severity: str = "error", config_obj: Any = None, reader: str | None = None
) -> list[Problem]:
    """``config_mismatch`` for each compute field the installed transformers reads differently from the file
    (``config_obj``: the object a trainer built its model from, named ``reader`` in the report; default: the
    installed class reading ``config``).

    The case this exists for: a transformers-5 config states rope_theta only inside ``rope_parameters``;
    transformers 4.x ignores that dict and uses its default rope_theta, and a buffer repair then computes
    ``inv_freq`` from the misread value. Nothing is reported for a config the installed transformers cannot read
    at all (the other checks say so).
    """
    import transformers

    if config_obj is None:
        cls = _config_class(config.get("model_type"))
        if cls is None:
            return []
        from transformers.utils import logging as tf_logging

        verbosity = tf_logging.get_verbosity()  # a config's own oddities (an eos id past the vocabulary) are not
        tf_logging.set_verbosity_error()  # this check's; progress-bar state is left as the caller set it
        try:
            config_obj = cls.from_dict(dict(config))
        except Exception:  # a config class rejects values with many exception types; other checks report it
            return []
        finally:
            tf_logging.set_verbosity(verbosity)
    wrote = config.get("transformers_version") or "an unrecorded version"
    running = transformers.__version__
    reader = reader or f"the installed transformers {running}"
    problems = []
    for name, value, used in misread_fields(config, config_obj):
        fix = (
            f"write {name} = {value!r} at the top level of config.json (transformers 4.x reads rope settings there)"
            if name.startswith("rope") and int(running.split(".")[0]) < 5
            else f"set {name} = {value!r} where the config is read"
        )
        problems.append(
            Problem(
                "config_mismatch",
                severity,
                name,
                f"{what} states {name} = {value!r} (written by transformers {wrote}), but {reader} uses {used!r}",
                f"the model built from this config computes differently from the one it describes: upgrade "
                f"transformers to the version that wrote it ({wrote}), or {fix}",
            )
        )
    return problems


def recorded_source_problems(manifest_path: Path, model_config: Any = None) -> tuple[list[Problem], str | None]:
    """The guard's config check: the source config.json its manifest records (``source.path``, unchanged since
    conversion), against ``model_config`` (the config object the trainer's model was built from: a difference is
    an error) or, without one, as the installed transformers reads it (a warning: the trainer may build from
    another file). Returns (problems, a note when it could not be checked)."""
    from flame_ext.errors import FlameExtError
    from flame_ext.io.manifest import config_hash, read_manifest

    try:
        source = read_manifest(manifest_path).get("source") or {}
    except FlameExtError:
        return [], None  # the reference check reports an unreadable manifest
    folder = source.get("path")
    file = Path(folder) / "config.json" if isinstance(folder, str) else None
    if file is None or not file.is_file():
        where = f"its folder {folder} is not on this machine" if file else f"{manifest_path} records no source path"
        return [], f"config: the source config.json was not checked against the installed transformers ({where})"
    try:
        config = read_model_config(file, what=str(file))
    except FlameExtError as exc:
        return [], f"config: {file} was not checked: {exc}"
    if config_hash(config) != source.get("config_sha256"):
        return [], f"config: {file} changed since the conversion (its hash differs); not checked"
    import transformers

    if isinstance(model_config, transformers.PretrainedConfig):  # an HF model (flame); torchtitan's own have none
        reader = f"the trainer's model (transformers {transformers.__version__})"
        return installed_reading_problems(config, what=str(file), config_obj=model_config, reader=reader), None
    return installed_reading_problems(config, what=str(file), severity="warning"), None
