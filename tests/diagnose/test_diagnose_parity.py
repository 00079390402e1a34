"""Training config and tokenizer against the HF model: what matters is an error, what does not is silent."""

from __future__ import annotations

import json

import pytest

from flame_ext.checks.config import (
    classify,
    compare_configs,
    normalized_config,
)
from tests.diagnose.conftest import ARCHS, problems_of


@pytest.mark.parametrize("arch", ARCHS)
def test_every_field_of_the_test_architectures_is_classified(arch, hf_models):
    cfg = json.loads((hf_models[arch] / "config.json").read_text())
    norm = normalized_config(cfg, what=arch)
    assert [k for k in norm if classify(k, norm) == "unlisted"] == []


def _hf_config(hf_models, arch="llama") -> dict:
    return json.loads((hf_models[arch] / "config.json").read_text())


def _with_rope_theta(cfg: dict, theta: float) -> dict:
    """A flame-style config: rope_theta at top level (transformers 5 reads it into rope_parameters)."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}
    out["rope_theta"] = theta
    return out


def test_rope_theta_difference_is_an_error_naming_both_values(hf_models):
    hf = _hf_config(hf_models)
    theta = normalized_config(hf, what="hf")["rope_theta"]
    problems = compare_configs(_with_rope_theta(hf, theta * 50), hf, train_name="train.json", hf_name="hf")
    assert [(p.kind, p.severity, p.key) for p in problems] == [("config_mismatch", "error", "rope_theta")]
    assert str(theta * 50) in problems[0].detail and str(float(theta)) in problems[0].detail


def test_bookkeeping_fields_are_ignored(hf_models):
    hf = _hf_config(hf_models)
    train = {
        **hf,
        "transformers_version": "0.0.1",
        "architectures": ["Other"],
        "use_cache": False,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.5,
        "_name_or_path": "/elsewhere",
    }
    assert compare_configs(train, hf, train_name="t", hf_name="h") == []


def test_training_and_unlisted_fields_are_warnings(hf_models):
    hf = _hf_config(hf_models)
    train = {**hf, "attention_dropout": 0.1, "a_field_nobody_knows": 3}
    problems = {p.key: p for p in compare_configs(train, hf, train_name="t", hf_name="h")}
    assert set(problems) == {"attention_dropout", "a_field_nobody_knows"}
    assert all(p.severity == "warning" for p in problems.values())
    assert "does not classify" in problems["a_field_nobody_knows"].detail


@pytest.mark.parametrize(
    "field,value",
    [
        ("rms_norm_eps", 1e-5),
        ("num_key_value_heads", 4),
        ("hidden_act", "gelu"),
        ("tie_word_embeddings", True),
        ("vocab_size", 320),
    ],
)
def test_computation_fields_are_errors(hf_models, field, value):
    hf = _hf_config(hf_models)
    problems = compare_configs({**hf, field: value}, hf, train_name="t", hf_name="h")
    assert [(p.key, p.severity) for p in problems] == [(field, "error")]


def test_max_position_embeddings_matters_only_with_scaled_rope(hf_models):
    hf = _hf_config(hf_models)
    longer = {**hf, "max_position_embeddings": 4096}
    assert [p.severity for p in compare_configs(longer, hf, train_name="t", hf_name="h")] == ["warning"]
    scaled = _with_rope_theta(hf, 10000.0)
    scaled["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    problems = compare_configs({**scaled, "max_position_embeddings": 4096}, scaled, train_name="t", hf_name="h")
    assert [(p.key, p.severity) for p in problems] == [("max_position_embeddings", "error")]


def test_cli_train_config_rope_theta(catalogue, hf_models, diagnose_json, tmp_path):
    hf = _hf_config(hf_models, "olmo2")
    theta = normalized_config(hf, what="hf")["rope_theta"]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "config.json").write_text(json.dumps(_with_rope_theta(hf, theta * 2)))
    code, r = diagnose_json(
        "--checkpoint", catalogue("olmo2"), "--model", hf_models["olmo2"], "--train-config", tmp_path / "train"
    )
    assert code == 1
    assert [(p["key"], p["severity"]) for p in problems_of(r, "config_mismatch")] == [("rope_theta", "error")]
    # The source's own config, as a file, is a clean pass.
    code, r = diagnose_json(
        "--checkpoint",
        catalogue("olmo2"),
        "--model",
        hf_models["olmo2"],
        "--train-config",
        hf_models["olmo2"] / "config.json",
    )
    assert code == 0 and not problems_of(r, "config_mismatch")


def test_tokenizer_larger_than_the_embedding(catalogue, hf_models, diagnose_json, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_models["olmo2"])
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tok.save_pretrained(tmp_path / "tok")
    rows = json.loads((hf_models["olmo2"] / "config.json").read_text())["vocab_size"]
    assert len(tok) > rows

    code, r = diagnose_json(
        "--checkpoint", catalogue("olmo2"), "--model", hf_models["olmo2"], "--tokenizer", tmp_path / "tok"
    )
    assert code == 1
    found = {p["key"]: p for p in problems_of(r, "tokenizer_mismatch")}
    assert found["vocab_size"]["severity"] == "error" and str(rows) in found["vocab_size"]["detail"]
    assert found["eos_token_id"]["severity"] == "warning"
    assert str(tok.eos_token_id) in found["eos_token_id"]["detail"]
