"""The host-independent guard (``flame_ext.guard``): settings, what a load requests, and the three checks
run directly on a model and a converted checkpoint, with no trainer around them."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch

from flame_ext.errors import GuardConfigError, InitialLoadValidationError
from flame_ext.guard import InitialLoadGuard, hf_loss_probe, split_request
from flame_ext.guard.options import GuardConfig
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.specs import TensorSpec


@pytest.mark.parametrize("delta", [-0.1, math.nan, math.inf, True, "0.1", 10**400])
def test_a_bad_threshold_is_refused_with_the_setting_named(delta):
    with pytest.raises(GuardConfigError, match="initial_load_max_loss_delta"):
        GuardConfig(initial_load_max_loss_delta=delta)


def test_settings_are_checked_and_default_to_off():
    assert GuardConfig() == GuardConfig(False, 0.1, None, True)
    with pytest.raises(GuardConfigError, match="validate_initial_load"):
        GuardConfig(validate_initial_load="yes")
    with pytest.raises(GuardConfigError, match="initial_load_reference"):
        GuardConfig(initial_load_reference="  ")
    assert GuardConfig(initial_load_max_loss_delta=0).initial_load_max_loss_delta == 0.0


def test_a_host_config_without_the_fields_means_off():
    class StockCheckpointSection:
        enable_checkpoint = True

    class Extended(StockCheckpointSection):
        validate_initial_load = True
        initial_load_max_loss_delta = 0.05

    assert GuardConfig.from_section(StockCheckpointSection()) == GuardConfig()
    assert GuardConfig.from_section(Extended()) == GuardConfig(True, 0.05, None, True)


def test_split_request_names_model_keys_with_global_shapes_and_other_states():
    class Wrapper:
        def state_dict(self):
            return {"w": torch.zeros(3, 4, dtype=torch.bfloat16)}

    flat = split_request({"a.weight": torch.zeros(2, 5), "b": torch.zeros(7)})
    assert flat.model == {"a.weight": TensorSpec((2, 5), "float32"), "b": TensorSpec((7,), "float32")}
    assert flat.model_prefix == "" and flat.other_states == []
    nested = split_request({"model": Wrapper(), "optimizer": object(), "dataloader": None, "train_state": object()})
    assert nested.model == {"model.w": TensorSpec((3, 4), "bfloat16")}
    assert nested.model_prefix == "model." and nested.other_states == ["optimizer", "train_state"]


def _plain_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).train()


def test_guard_on_its_own_passes_a_healthy_load(tiny_model, tiny_dcp, caplog):
    caplog.set_level(logging.INFO, logger="flame_ext")
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(tiny_dcp), [model])
    guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(tiny_dcp))
    report = guard.after_load(hf_loss_probe(model), loaded=model.state_dict())
    assert report.ok and abs(report.loss.delta) < 0.01
    assert model.training  # eval mode only for the forward pass
    # The last line a user reads before training starts names every check that ran, the values included.
    assert f"initial load of {tiny_dcp} validated (keys, manifest, values, buffers, loss: " in caplog.messages[-1]


def test_a_shorter_or_chunked_host_compares_the_matching_prefix(tiny_model, tiny_dcp):
    """A native model's RoPE table ends at the training length, a chunked loss needs a multiple: the
    reference is cut to the same prefix (exact for a causal model), not compared against the whole row."""
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(tiny_dcp), [model])
    guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(tiny_dcp))
    report = guard.after_load(hf_loss_probe(model), position_multiple=8, max_positions=100)
    assert report.loss.by_position[-1]["end"] == 96
    per_token = json.loads((tiny_dcp / "flame_ext.json").read_text())["reference"]["loss_per_token"]
    expected = sum(sum(row[:96]) for row in per_token) / (96 * len(per_token))
    assert report.loss.reference == pytest.approx(expected, abs=1e-5) and abs(report.loss.delta) < 0.01


def test_a_reference_for_another_vocabulary_is_refused_before_loading(tiny_model, tiny_dcp, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dcp, folder)
    manifest = json.loads((folder / "flame_ext.json").read_text())
    manifest["reference"]["token_ids"][0][5] = 10**6
    (folder / "flame_ext.json").write_text(json.dumps(manifest))
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(folder), [model])
    with pytest.raises(InitialLoadValidationError, match="outside the model's vocabulary") as info:
        guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(folder))
    assert info.value.report.problems[0].kind == "manifest"


def _set(path: tuple, value) -> object:
    """A change to a reference record: the item at ``path`` (keys and indexes) set to ``value``, or removed."""

    def change(ref: dict) -> None:
        *parents, last = path
        target = ref
        for p in parents:
            target = target[p]
        if value is _REMOVE:
            target.pop(last)
        else:
            target[last] = value

    return change


_REMOVE = object()
# name -> (field the message must name, change); each breaks one field of a sound record.
BAD_REFERENCES = {
    "id below zero": ("token_ids", _set(("token_ids", 1, 3), -7)),
    "id a float": ("token_ids", _set(("token_ids", 0, 0), 12.0)),
    "id a bool": ("token_ids", _set(("token_ids", 0, 1), False)),
    "id a string": ("token_ids", _set(("token_ids", 0, 1), "65")),
    "rows of unequal length": ("token_ids", _set(("token_ids", 1, -1), _REMOVE)),
    "ids not rows": ("token_ids", _set(("token_ids",), [5, 6, 7])),
    "one token per row": ("token_ids", _set(("token_ids",), [[5], [6]])),
    "loss row of another length": ("loss_per_token", _set(("loss_per_token", 0), [1.0] * 7)),
    "losses missing a row": ("loss_per_token", _set(("loss_per_token", -1), _REMOVE)),
    "a NaN loss": ("loss_per_token", _set(("loss_per_token", 1, 4), math.nan)),
    "an infinite loss": ("loss_per_token", _set(("loss_per_token", 0, 0), math.inf)),
    "losses a number": ("loss_per_token", _set(("loss_per_token",), 2.5)),
    "loss_mean null": ("loss_mean", _set(("loss_mean",), None)),
    "loss_mean a list": ("loss_mean", _set(("loss_mean",), [2.0])),
    "loss_mean NaN": ("loss_mean", _set(("loss_mean",), math.nan)),
    # the examples of the issue that asked for these checks
    "issue: negative id": ("token_ids", _set(("token_ids", 0, 2), -1)),
    "issue: float id": ("token_ids", _set(("token_ids", 0, 2), 65.5)),
    "issue: ragged rows": ("token_ids", _set(("token_ids", 0), [65, 66, 67])),
    "issue: flat ids": ("token_ids", lambda ref: ref.__setitem__("token_ids", ref["token_ids"][0])),
    "issue: string loss_mean": ("loss_mean", _set(("loss_mean",), "2.1")),
    "issue: null loss_per_token": ("loss_per_token", _set(("loss_per_token",), None)),
    "issue: short loss_per_token": ("loss_per_token", lambda ref: ref["loss_per_token"][0].pop()),
    "issue: all-NaN loss_per_token": (
        "loss_per_token",
        lambda ref: ref.__setitem__("loss_per_token", [[math.nan] * len(r) for r in ref["loss_per_token"]]),
    ),
}


@pytest.mark.parametrize("name", list(BAD_REFERENCES))
def test_a_bad_reference_file_stops_the_guard_before_loading_naming_the_field(name, tiny_model, tiny_dcp, tmp_path):
    manifest = json.loads((tiny_dcp / "flame_ext.json").read_text())
    field, change = BAD_REFERENCES[name]
    change(manifest["reference"])
    ref_file = tmp_path / "reference.json"
    ref_file.write_text(json.dumps(manifest))  # NaN written as the NaN literal Python's json reads back
    model = _plain_model(tiny_model)
    loads = []
    guard = InitialLoadGuard(
        GuardConfig(validate_initial_load=True, initial_load_reference=str(ref_file)), str(tiny_dcp), [model]
    )
    with pytest.raises(InitialLoadValidationError) as info:
        guard.before_load(split_request(model.state_dict()), lambda: loads.append(1) or read_dcp_metadata(tiny_dcp))
    problems = info.value.report.errors
    assert [p.kind for p in problems] == ["manifest"], info.value.report.to_dict()
    detail = problems[0].detail
    assert "\n" not in detail and str(ref_file) in detail and f"reference.{field}" in detail, detail
    # The checkpoint's own metadata is still checked (keys and shapes are fine here, so the reference is the
    # only problem); no tensor is read before the verdict.
    assert loads == [1]


def test_a_stock_converter_checkpoint_without_manifest_says_what_is_wrong_with_it_first(tiny_model, tmp_path):
    """flame's stock converter: nested ``model.`` keys and no manifest. The report leads with the layout (what
    is wrong with the checkpoint), then the missing reference; parameters are counted, and the message points
    at the JSON record in the log, not at a --json that a trainer does not have."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    folder = tmp_path / "step-0"
    convert_hf_to_dcp(
        ConvertOptions(model=str(tiny_model), checkpoint=str(folder), layout="nested", reference=False, progress=False)
    )
    (folder / "flame_ext.json").unlink()
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(folder), [model])
    with pytest.raises(InitialLoadValidationError) as info:
        guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(folder))
    errors = info.value.report.errors
    assert errors[0].kind == "layout" and "re-convert with `flame-ext convert`" in errors[0].hint
    assert errors[-1].kind == "manifest" and "does not exist" in errors[-1].detail
    assert "initial_load_reference" in errors[-1].hint
    message = str(info.value)
    assert "parameters: HF 0" not in message and "see --json" not in message and " 1 errors" not in message
    assert info.value.report.counts["hf_params"] > 0


def test_plot_setting_is_checked(tmp_path):
    with pytest.raises(GuardConfigError, match="initial_load_plot.*ending in .png"):
        GuardConfig(initial_load_plot=str(tmp_path / "loss.pdf"))
    assert GuardConfig(initial_load_plot="~/loss.png").initial_load_plot.endswith("/loss.png")


@pytest.mark.parametrize("broken", [False, True], ids=["healthy", "rope-broken"])
def test_guard_draws_the_plot_on_rank_0_even_when_it_stops_the_run(broken, tiny_model, tiny_dcp, tmp_path):
    from PIL import Image

    from flame_ext.io.plot import PLOT_SIZE

    plot = tmp_path / "step0.png"
    model = _plain_model(tiny_model)
    config = GuardConfig(validate_initial_load=True, initial_load_plot=str(plot), initial_load_repair_buffers=False)
    guard = InitialLoadGuard(config, str(tiny_dcp), [model])
    guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(tiny_dcp))
    if broken:
        model.model.rotary_emb.inv_freq.mul_(0.25)  # positions rotate at the wrong speed
        with pytest.raises(InitialLoadValidationError) as info:
            guard.after_load(hf_loss_probe(model))
        report = info.value.report
    else:
        report = guard.after_load(hf_loss_probe(model))
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE
    assert f"per-position step-0 loss drawn in {plot}" in report.notes
    curve = report.loss.curve
    assert len(curve["observed"]) == len(curve["reference"]) == report.loss.by_position[-1]["end"]
    gaps = [o - r for o, r in zip(curve["observed"], curve["reference"])]
    if broken:  # a RoPE fault: right at the first position, wrong later
        assert abs(gaps[0]) < 1e-3 and sum(gaps[-50:]) / 50 > 0.1
    else:
        assert max(abs(g) for g in gaps) < 1e-3


def _guard_after_load(model, checkpoint, probe):
    """The guard's two steps on an already loaded model (the OLMo2 runs on the CPU)."""
    from flame_ext.guard import RequestedLoad

    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(checkpoint), [model])
    specs = {k: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    guard.before_load(RequestedLoad(specs, []), lambda: read_dcp_metadata(checkpoint))
    return guard.after_load(probe)


def test_the_loss_gate_is_skipped_only_for_a_device_that_cannot_run_the_model(tiny_model, tiny_dcp, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def no_gpu(ids, ranges):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    report = _guard_after_load(model, tiny_dcp, no_gpu)
    assert report.ok and report.loss is None
    assert any("loss gate skipped" in r.getMessage() for r in caplog.records)

    def broken(ids, ranges):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _guard_after_load(model, tiny_dcp, broken)


def test_a_dtype_the_manifest_records_as_chosen_is_a_note_for_the_guard_too(tiny_model, tmp_path):
    """`convert --dtype bfloat16` loaded into float32 parameters: the cast was chosen (checks.recorded, the rule
    diagnose uses), so the guard's report says so in one note instead of 25 dtype warnings."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    folder = tmp_path / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(tiny_model), checkpoint=str(folder), dtype="bfloat16", progress=False))
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(folder), [model])
    guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(folder))
    assert guard.report.warnings == [] and guard.report.counts["dtype"] == 25
    note = (
        f"dtype bfloat16, chosen at conversion (`convert --dtype bfloat16`, recorded in {folder / 'flame_ext.json'}): "
        "the model is float32, and a load casts the 25 tensors"
    )
    assert note in guard.report.notes


def test_a_recorded_nested_layout_under_a_model_only_load_is_still_an_error_saying_it_was_chosen(tiny_model, tmp_path):
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    folder = tmp_path / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(tiny_model), checkpoint=str(folder), layout="nested", progress=False))
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(folder), [model])
    with pytest.raises(InitialLoadValidationError) as info:
        guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(folder))
    (error,) = info.value.report.errors  # one cause, one error: the keys it leaves missing are counted in it
    assert error.kind == "layout" and "so 25 keys are missing under their own names and 25 unexpected" in error.detail
    assert error.hint.startswith("converted with `--layout nested` (recorded in ")
    assert "initial_load_model_weights_only = false" in error.hint
