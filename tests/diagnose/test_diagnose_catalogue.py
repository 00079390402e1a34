"""The catalogue: every way of breaking a converted checkpoint the issue lists, on three architectures.

Each broken checkpoint is diagnosed through the real CLI (``flame-ext diagnose ... --json``, in process)
and must be flagged with the right problem kind, and healthy ones must pass. Expected keys are derived
from the edit and from the HF files, never copied from a run.
"""

from __future__ import annotations

import pytest
import torch

from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.hf import open_hf, read_tensor
from flame_ext.io.registry import transformers_major
from tests.diagnose.conftest import (
    ARCHS,
    DROPPED,
    NAN_KEY,
    SWAP,
    TRANSPOSED,
    ZEROED_MLP,
    kinds,
    load_all,
    problems_of,
    rotary_interleaved_keys,
)

# slow: trains two tiny models on a cold cache, then diagnoses ~40 broken checkpoints (make test-fast leaves it out).
pytestmark = pytest.mark.slow

RIGHT_SHAPE_WRONG = ("swapped_layers", "transposed", "zeroed_mlp", "nan")


def _hf_differs(model, key_a: str, key_b: str) -> bool:
    hf = open_hf(model)
    return not torch.equal(read_tensor(hf.tensors[key_a]), read_tensor(hf.tensors[key_b]))


@pytest.mark.parametrize("arch", ARCHS)
def test_healthy_conversion_passes_every_pass(arch, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue(arch), "--model", hf_models[arch], "--values", "--loss")
    assert code == 0 and r["ok"], r["problems"]
    assert r["counts"]["hf_params"] == r["counts"]["dcp_params"] > 0
    assert all(r["counts"][k] == 0 for k in ("missing", "unexpected", "shape", "dtype"))
    assert abs(r["loss"]["delta"]) < 1e-3  # same weights, same dtype, same batch: rounding noise only
    # The only thing a healthy checkpoint may be warned about is the trainer's load path (transformers 4.x).
    if transformers_major() >= 5:
        assert r["problems"] == []
    else:
        assert kinds(r) == {"buffer_mismatch"}


@pytest.mark.parametrize("arch", ARCHS)
def test_inv_freq_load_path_hazard_depends_on_transformers(arch, catalogue, hf_models, diagnose_json):
    """transformers 4.x post_init() does not recompute inv_freq after meta + to_empty(): a warning; 5.x does."""
    _, r = diagnose_json("--checkpoint", catalogue(arch), "--model", hf_models[arch], "--loss")
    hazards = problems_of(r, "buffer_mismatch")
    if transformers_major() >= 5:
        assert hazards == []
    else:
        assert any(p["key"].endswith("rotary_emb.inv_freq") for p in hazards)
        assert all(p["severity"] == "warning" and "not a fault of this checkpoint" in p["hint"] for p in hazards)
    assert r["ok"]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_conversion_is_a_recorded_choice_and_passes_values_and_loss(arch, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue(arch, "bf16"), "--model", hf_models[arch], "--values", "--loss")
    # transformers 4.57 adds its load-path hazard warning (inv_freq under meta + to_empty), whatever the dtype.
    assert code == 0 and r["ok"] and all(p["kind"] == "buffer_mismatch" for p in r["problems"]), r["problems"]
    assert not problems_of(r, "dtype_mismatch")  # `convert --dtype bfloat16` is recorded in flame_ext.json: a choice
    n = len(read_dcp_metadata(catalogue(arch, "bf16")))
    assert r["counts"]["dtype"] == n  # every tensor was cast, and counted
    assert (
        "dtype bfloat16, chosen at conversion (`convert --dtype bfloat16`, recorded in flame_ext.json): the model is "
        f"float32, and a load casts the {n} tensors"
    ) in r["notes"]
    assert not problems_of(r, "value_mismatch")
    assert abs(r["loss"]["delta"]) <= r["loss"]["threshold"] == 0.1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", RIGHT_SHAPE_WRONG)
def test_right_shaped_wrong_tensors_are_caught_by_values_and_loss(arch, case, catalogue, hf_models, diagnose_json):
    ckpt, model = catalogue(arch, case), hf_models[arch]
    code, meta_only = diagnose_json("--checkpoint", ckpt, "--model", model)
    assert code == 0 and meta_only["ok"], "metadata alone cannot see a right-shaped wrong tensor"

    code, r = diagnose_json("--checkpoint", ckpt, "--model", model, "--values", "--loss")
    assert code == 1 and not r["ok"]
    gap = problems_of(r, "loss_gap")
    assert len(gap) == 1 and gap[0]["severity"] == "error"
    assert r["loss"]["delta"] is None or abs(r["loss"]["delta"]) > 0.1  # NaN (null in JSON) or a real gap
    assert "positional encoding" not in gap[0]["hint"], "these faults change the first position too"
    flagged = {p["key"] for p in r["problems"] if p["kind"] in ("value_mismatch", "nonfinite")}
    if case == "swapped_layers":
        a, b = SWAP
        layer0 = [k for k in open_hf(model).tensors if k.startswith(a)]
        expected = {k for k in layer0 if _hf_differs(model, k, b + k[len(a) :])}
        expected |= {b + k[len(a) :] for k in expected}
        # One cause, one error: the two layers named, with the count of tensors holding each other's values.
        (swap,) = problems_of(r, "value_mismatch")
        assert swap["key"] is None and expected, swap
        assert swap["detail"].startswith(f"{a[:-1]} and {b[:-1]} are swapped: {len(expected)} tensors hold each other")
    elif case == "transposed":
        assert flagged == {TRANSPOSED}
        assert "it holds the expected values transposed" in problems_of(r, "value_mismatch")[0]["detail"]
    elif case == "zeroed_mlp":
        assert flagged == {k for k in open_hf(model).tensors if k.startswith(ZEROED_MLP)}
        assert all("only zeros" in p["detail"] for p in problems_of(r, "value_mismatch"))
    else:
        nonfinite = problems_of(r, "nonfinite")
        assert [p["key"] for p in nonfinite] == [NAN_KEY] and "1 of" in nonfinite[0]["detail"]
    for p in problems_of(r, "value_mismatch"):  # per tensor, its largest difference; a folded swap, its count
        assert ("max abs diff" in p["detail"] or " are swapped: " in p["detail"]) and p["severity"] == "error"


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_key(arch, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue(arch, "dropped_key"), "--model", hf_models[arch], "--loss")
    assert code == 1
    assert [p["key"] for p in problems_of(r, "missing_key")] == [DROPPED]
    assert r["counts"]["missing"] == 1
    # The manifest was copied from the healthy conversion: its table no longer matches .metadata.
    assert any("stale" in p["detail"] and DROPPED in p["detail"] for p in problems_of(r, "manifest"))
    assert r["loss"] is None  # a trainer's strict load fails on the missing key: no loss to measure


@pytest.mark.parametrize("arch", ARCHS)
def test_every_key_nested_under_model(arch, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue(arch, "nested"), "--model", hf_models[arch], "--values", "--loss")
    assert code == 1
    layout = problems_of(r, "layout")
    assert len(layout) == 1 and layout[0]["severity"] == "error" and "'model.' prefix" in layout[0]["detail"]
    assert "flat" in layout[0]["hint"]
    assert r["counts"]["missing"] == r["counts"]["unexpected"] > 0
    # Only the names are wrong: the values, read through the layout, match and the loss reproduces.
    assert not kinds(r) & {"value_mismatch", "nonfinite", "loss_gap"}
    assert abs(r["loss"]["delta"]) < 1e-3
    assert problems_of(r, "manifest")[0]["severity"] == "warning"  # converted elsewhere: no manifest


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_padded_embedding(arch, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue(arch, "vocab_padded"), "--model", hf_models[arch], "--values")
    assert code == 1
    padded = [p for p in problems_of(r, "layout") if "padded" in p["detail"]]
    assert {p["key"] for p in padded} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert {p["key"] for p in problems_of(r, "shape_mismatch")} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "vocab_size" in padded[0]["hint"]


def test_wrapper_infix(catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue("llama", "orig_mod"), "--model", hf_models["llama"], "--values")
    assert code == 1
    layout = problems_of(r, "layout")
    assert len(layout) == 1 and "'_orig_mod.'" in layout[0]["detail"]
    assert not problems_of(r, "value_mismatch")  # values found through the wrapper names


def test_tied_embedding_model_passes(catalogue, diagnose_json, tied_model):
    code, r = diagnose_json("--checkpoint", catalogue("qwen2_tied"), "--model", tied_model, "--values", "--loss")
    assert code == 0 and r["ok"]
    assert abs(r["loss"]["delta"]) < 1e-3


def test_tied_head_left_out_is_a_layout_problem(catalogue, diagnose_json, tied_model):
    code, r = diagnose_json("--checkpoint", catalogue("qwen2_tied", "tied_head_dropped"), "--model", tied_model)
    assert code == 1
    tie = [p for p in problems_of(r, "layout") if p["key"] == "lm_head.weight"]
    assert len(tie) == 1 and "ties" in tie[0]["detail"]


@pytest.mark.parametrize("arch", ("olmo2", "llama"))
def test_manifest_from_another_model(arch, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json("--checkpoint", catalogue(arch, "foreign_manifest"), "--model", hf_models[arch], "--loss")
    assert code == 1
    assert any(p["severity"] == "error" and "another model" in p["detail"] for p in problems_of(r, "manifest"))
    # The foreign reference is not used: the loss is measured against this model's HF side instead.
    assert abs(r["loss"]["delta"]) < 1e-3


@pytest.mark.parametrize("arch", ("olmo2", "qwen2"))
@pytest.mark.parametrize("generation", ("full_titan03", "full_titan01"))
def test_full_training_checkpoint_model_part_is_compared(arch, generation, catalogue, hf_models, diagnose_json):
    code, r = diagnose_json(
        "--checkpoint", catalogue(arch, generation), "--model", hf_models[arch], "--values", "--loss"
    )
    assert code == 0 and r["ok"], r["problems"]
    assert not problems_of(r, "layout") and r["counts"]["unexpected"] == 0
    assert any(n.startswith("full training checkpoint") and "optimizer" in n for n in r["notes"])
    nested_note = any("torchtitan 0.1" in n for n in r["notes"])
    assert nested_note == (generation == "full_titan01")
    assert r["counts"]["hf_params"] == r["counts"]["dcp_params"]
    assert abs(r["loss"]["delta"]) < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_rotary_layout_mixup_gets_the_positional_hint(arch, catalogue, hf_models, diagnose_json):
    """q/k channels in the interleaved rotary layout: every shape and key right, the loss wrong everywhere but
    at the first position, and the hint names positional encoding; --values names the permuted tensors."""
    ckpt, model = catalogue(arch, "rotary_interleaved"), hf_models[arch]
    code, r = diagnose_json("--checkpoint", ckpt, "--model", model, "--loss")
    assert code == 1 and not r["ok"]
    gap = problems_of(r, "loss_gap")
    assert len(gap) == 1 and "positional encoding" in gap[0]["hint"], r["loss"]
    # The first position is exact (its token attends only to itself); the gap is all in the later ones.
    assert abs(r["loss"]["first_position_delta"]) < 1e-3 < 0.1 < r["loss"]["delta"], r["loss"]
    # With --values the evidence is the tensors themselves: they are named, with the rotary layout as the
    # likely cause, and the loss-gap hint points at them instead of guessing from positions.
    code, r = diagnose_json("--checkpoint", ckpt, "--model", model, "--values", "--loss")
    flagged = {p["key"] for p in problems_of(r, "value_mismatch")}
    assert flagged == set(rotary_interleaved_keys(load_all(catalogue(arch))))
    assert all("rotary" in p["hint"] for p in problems_of(r, "value_mismatch"))
    assert "positional encoding" not in problems_of(r, "loss_gap")[0]["hint"]
