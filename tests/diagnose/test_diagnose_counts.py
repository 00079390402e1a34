"""Tied embeddings: one parameter under two names, counted once by convert, the manifest and diagnose alike;
``to-hf`` says the twin it leaves out is tied, not "not part of the HF model"."""

from __future__ import annotations

import json

from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from tests.diagnose.conftest import one_thread


def test_tied_parameter_counts_agree(tied_model, tmp_path, diagnose_json):
    from transformers import AutoModelForCausalLM

    dcp = tmp_path / "step-0"
    with one_thread():
        summary = convert_hf_to_dcp(
            ConvertOptions(model=str(tied_model), checkpoint=str(dcp), reference=False, progress=False)
        )
    manifest = json.loads((dcp / "flame_ext.json").read_text())
    code, report = diagnose_json("--checkpoint", dcp, "--model", tied_model)
    truth = AutoModelForCausalLM.from_pretrained(tied_model).num_parameters()  # transformers counts a tied pair once
    assert code == 0
    assert summary.parameters == manifest["total_parameters"] == truth
    assert report["counts"]["hf_params"] == report["counts"]["dcp_params"] == truth


def test_to_hf_note_for_a_tied_head_says_tied(tied_model, tmp_path):
    dcp = tmp_path / "step-0"
    with one_thread():
        convert_hf_to_dcp(ConvertOptions(model=str(tied_model), checkpoint=str(dcp), reference=False, progress=False))
        summary = convert_dcp_to_hf(
            ToHFOptions(checkpoint=str(dcp), config=str(tied_model), out=str(tmp_path / "hf"), progress=False)
        )
    assert summary.notes == [
        "lm_head.weight: tied to model.embed_tokens.weight (the same tensor); "
        "HF files hold it once, as model.embed_tokens.weight"
    ]
