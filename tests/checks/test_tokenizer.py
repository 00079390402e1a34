"""The tokenizer check: a source model whose own tokenizer yields ids beyond its embedding is a warning about the
source (the conversion copied it faithfully); the same tokenizer given as the trainer's is an error.

The case as a new user meets it: a Qwen2-style tokenizer that adds ``<|endoftext|>`` as id 256 to a model
with a 256-row embedding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import report_json

from flame_ext.cli import main


@pytest.fixture(scope="module")
def model_256(tmp_path_factory) -> Path:
    from support.models import byte_tokenizer, save_tiny_model

    out = tmp_path_factory.mktemp("qwen2-256") / "model"
    save_tiny_model(
        out, "qwen2", vocab_size=256, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False
    )
    fast = byte_tokenizer()  # ids 0-255: the bytes; <|endoftext|> added after them
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 256  # added past the 256-row embedding
    fast.save_pretrained(out)
    return out


def _diagnose(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["diagnose", *map(str, argv), "--json"])
    return code, report_json(capsys.readouterr().out)


def test_source_tokenizer_beyond_its_embedding_is_a_warning_about_the_source(model_256, tmp_path, capsys):
    ckpt = tmp_path / "step-0"
    assert main(["convert", "--model", str(model_256), "--checkpoint", str(ckpt), "--no-reference"]) == 0
    code, report = _diagnose(capsys, "--checkpoint", ckpt, "--model", model_256, "--values")
    tok = [p for p in report["problems"] if p["kind"] == "tokenizer_mismatch" and p["key"] == "vocab_size"]
    assert code == 0 and report["verdict"] == "OK", report["problems"]
    assert len(tok) == 1 and tok[0]["severity"] == "warning"
    assert "the source model's own tokenizer" in tok[0]["detail"] and "up to 256" in tok[0]["detail"]
    # The same tokenizer named as the trainer's (--tokenizer): ids the model cannot take, an error.
    code, report = _diagnose(capsys, "--checkpoint", ckpt, "--model", model_256, "--tokenizer", model_256)
    errors = [p for p in report["problems"] if p["kind"] == "tokenizer_mismatch" and p["severity"] == "error"]
    assert code == 1 and len(errors) == 1
