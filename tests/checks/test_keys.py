"""``flame_ext.checks.keys``: each rule of the key/shape/dtype comparison on small spec tables (taken from real
tensors: ``TensorSpec.of``-style shapes and dtypes, no checkpoint needed), every decision shown as the problem
a user reads."""

from __future__ import annotations

import torch

from flame_ext.checks.keys import compare_specs, model_part
from flame_ext.checks.recorded import RecordedChoices
from flame_ext.io.key_names import locate_keys
from flame_ext.io.specs import TensorSpec


def _specs(**tensors: torch.Tensor) -> dict[str, TensorSpec]:
    return {
        k.replace("__", "."): TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for k, t in tensors.items()
    }


MODEL = _specs(
    embed__weight=torch.zeros(10, 4),
    layer__weight=torch.zeros(4, 4),
    norm__weight=torch.ones(4),
    head__weight=torch.zeros(10, 4),
)


def test_the_same_table_has_no_problem_and_counts_each_parameter():
    result = compare_specs(MODEL, dict(MODEL))
    assert result.problems == [] and result.notes == []
    assert result.counts == {"hf_params": 100, "dcp_params": 100, "missing": 0, "unexpected": 0, "shape": 0, "dtype": 0}


def test_a_missing_and_an_unexpected_key_are_one_error_each_with_what_a_load_does():
    found = {k: v for k, v in MODEL.items() if k != "norm.weight"} | {"extra.weight": TensorSpec((4,), "float32")}
    result = compare_specs(MODEL, found)
    assert [(p.kind, p.key) for p in result.problems] == [
        ("missing_key", "norm.weight"),
        ("unexpected_key", "extra.weight"),
    ]
    assert "the load would fail on this key" in result.problems[0].hint
    assert "a load silently ignores it" in result.problems[1].hint
    assert (result.counts["missing"], result.counts["unexpected"]) == (1, 1)


def test_a_nested_layout_is_one_error_counting_the_keys_it_leaves_missing_and_unexpected():
    found = {"model." + k: v for k, v in MODEL.items()}
    result = compare_specs(MODEL, found)
    (problem,) = result.problems
    assert problem.kind == "layout" and problem.key is None
    assert problem.detail == (
        "4 of 4 keys sit under an extra 'model.' prefix (e.g. model.embed.weight); so 4 keys are missing under their "
        "own names and 4 unexpected under these (not listed one by one)"
    )
    assert "flame's stock converter" in problem.hint and "layout flat" in problem.hint
    assert (result.counts["missing"], result.counts["unexpected"]) == (4, 4)  # the keys are still counted
    assert locate_keys(MODEL, found) == {k: "model." + k for k in MODEL}  # values are still read through it


def test_a_recorded_nested_layout_keeps_the_error_under_a_flat_load_and_says_it_was_chosen():
    result = compare_specs(MODEL, {"model." + k: v for k, v in MODEL.items()}, choices=RecordedChoices(layout="nested"))
    (problem,) = result.problems
    assert problem.hint.startswith("converted with `--layout nested` (recorded in flame_ext.json)")


def test_wrapper_infixes_are_one_layout_error():
    found = {k.replace("layer.", "layer._orig_mod.") if k.startswith("layer") else k: v for k, v in MODEL.items()}
    (problem,) = compare_specs(MODEL, found).problems
    assert problem.kind == "layout" and "'_orig_mod.'" in problem.detail and "so 1 keys are missing" in problem.detail
    assert locate_keys(MODEL, found)["layer.weight"] == "layer._orig_mod.weight"


def test_a_tied_head_left_out_is_a_layout_error_on_its_key():
    found = {k: v for k, v in MODEL.items() if k != "head.weight"}
    problems = compare_specs(MODEL, found, tied={"head.weight": "embed.weight"}).problems
    assert [(p.kind, p.key) for p in problems] == [("layout", "head.weight")]  # one cause: not missing_key too
    result = compare_specs(MODEL, found, tied={"head.weight": "embed.weight"})
    assert (result.counts["hf_params"], result.counts["missing"]) == (60, 1)  # a tied pair counted once


def test_a_padded_vocabulary_is_named_beside_its_shape_error():
    found = dict(MODEL) | {"embed.weight": TensorSpec((16, 4), "float32")}
    problems = compare_specs(MODEL, found).problems
    assert [p.kind for p in problems] == ["layout", "shape_mismatch"]
    assert problems[0].detail == "vocabulary padded from 10 to 16 rows (a multiple of 16)"
    assert problems[1].detail == "checkpoint [16, 4], model [10, 4]"


def test_one_cast_of_every_tensor_is_one_warning_with_its_count_and_mixed_casts_one_each():
    bf16 = {k: TensorSpec(v.shape, "bfloat16") for k, v in MODEL.items()}
    (problem,) = compare_specs(MODEL, bf16).problems
    assert (problem.kind, problem.severity, problem.key) == ("dtype_mismatch", "warning", None)
    assert problem.detail == "all 4 tensors: checkpoint bfloat16, model float32"
    mixed = bf16 | {"norm.weight": TensorSpec((4,), "float16")}
    assert [p.key for p in compare_specs(MODEL, mixed).problems] == list(MODEL)


def test_a_dtype_the_manifest_records_is_a_note_and_another_is_still_a_warning():
    bf16 = {k: TensorSpec(v.shape, "bfloat16") for k, v in MODEL.items()}
    result = compare_specs(MODEL, bf16, choices=RecordedChoices(dtype="bfloat16"))
    assert result.problems == [] and result.counts["dtype"] == 4
    assert result.notes == [
        "dtype bfloat16, chosen at conversion (`convert --dtype bfloat16`, recorded in flame_ext.json): the model "
        "is float32, and a load casts the 4 tensors"
    ]
    other = compare_specs(MODEL, bf16, choices=RecordedChoices(dtype="float16"))
    assert [p.kind for p in other.problems] == ["dtype_mismatch"] and other.notes == []


def test_fresh_keys_may_be_absent_and_training_state_is_not_the_model():
    found = {k: v for k, v in MODEL.items() if k != "head.weight"}
    assert compare_specs(MODEL, found, fresh=["head.weight"]).problems == []
    with_state = dict(MODEL) | {
        "optimizer.state.embed.weight.exp_avg": TensorSpec((10, 4), "float32"),
        "train_state": None,
    }
    assert model_part(with_state) == MODEL and compare_specs(MODEL, with_state).problems == []
