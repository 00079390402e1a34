"""The config check's version awareness: a config the installed transformers reads differently from the one
that wrote it. The case: a transformers-5 config stating rope_theta only inside ``rope_parameters``, which
transformers 4.x ignores (it takes its default rope_theta). Run in both environments: the finding under 4.57,
its absence under 5.x."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.cli import report_json, transformers_major

from flame_ext.checks.config import installed_reading_problems
from flame_ext.cli import main

THETA = 500000.0

only_4x = pytest.mark.skipif(transformers_major() >= 5, reason="transformers >= 5 reads rope_parameters")
only_5x = pytest.mark.skipif(transformers_major() < 5, reason="transformers 4.x ignores rope_parameters")


def rope_parameters_config(**over) -> dict:
    """A tiny OLMo2 config as transformers 5 writes it: rope settings only inside rope_parameters."""
    return {
        "architectures": ["Olmo2ForCausalLM"],
        "model_type": "olmo2",
        "vocab_size": 257,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_type": "default", "rope_theta": THETA},
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 256,
        "pad_token_id": 256,
        "transformers_version": "5.24.0",
        **over,
    }


@pytest.fixture(scope="module")
def theta_model(tiny_model, tmp_path_factory) -> Path:
    """The embedded model's files with that config (rope_theta 500000 stated only in rope_parameters)."""
    folder = tmp_path_factory.mktemp("rope-parameters") / "olmo2"
    shutil.copytree(tiny_model, folder)
    (folder / "config.json").write_text(json.dumps(rope_parameters_config(), indent=2))
    return folder


@only_4x
def test_4x_reading_a_5x_config_is_an_error_naming_field_values_versions_and_fix():
    import transformers

    problems = installed_reading_problems(rope_parameters_config(), what="config.json")
    assert [(p.kind, p.severity, p.key) for p in problems] == [("config_mismatch", "error", "rope_theta")]
    detail, hint = problems[0].detail, problems[0].hint
    assert "500000.0" in detail and "uses 10000" in detail
    assert "5.24.0" in detail and transformers.__version__ in detail
    assert "upgrade transformers" in hint and "top level" in hint


@only_5x
def test_5x_reads_the_same_config_as_written():
    assert installed_reading_problems(rope_parameters_config(), what="config.json") == []


def test_a_config_every_version_reads_alike_passes():
    """rope_theta at the top level (4.x spelling): read the same by 4.57 and by 5.x."""
    legacy = rope_parameters_config(rope_theta=THETA, transformers_version="4.57.6")
    del legacy["rope_parameters"]
    assert installed_reading_problems(legacy, what="config.json") == []
    # the default theta stated in rope_parameters: 4.x misses the dict but lands on the same value
    same = rope_parameters_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert installed_reading_problems(same, what="config.json") == []


def _diagnose(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["diagnose", *args, "--json"])
    return code, report_json(capsys.readouterr().out)


def test_diagnose_flags_it_in_the_metadata_pass(theta_model, tmp_path, capsys):
    dcp = tmp_path / "step-0"
    assert main(["convert", "--model", str(theta_model), "--checkpoint", str(dcp), "--no-reference"]) == 0
    code, report = _diagnose(capsys, "--checkpoint", str(dcp), "--model", str(theta_model))
    found = [p for p in report["problems"] if p["kind"] == "config_mismatch"]
    if transformers_major() < 5:
        assert code == 1 and [(p["severity"], p["key"]) for p in found] == [("error", "rope_theta")]
        assert str(theta_model) in found[0]["detail"]
    else:
        assert code == 0 and found == []
