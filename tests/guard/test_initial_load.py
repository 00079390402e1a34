"""The host-independent guard (``flame_ext.guard``): settings, what a load requests, and the three checks
run directly on a model and a converted checkpoint, with no trainer around them."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from flame_ext.errors import GuardConfigError, InitialLoadValidationError
from flame_ext.guard.initial_load import InitialLoadGuard, hf_loss_probe, split_request
from flame_ext.guard.options import GuardConfig
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.specs import TensorSpec


@pytest.mark.parametrize("delta", [-0.1, math.nan, math.inf, True, "0.1"])
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


def test_guard_on_its_own_passes_a_healthy_load(tiny_model, tiny_dcp):
    model = _plain_model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), str(tiny_dcp), [model])
    guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(tiny_dcp))
    report = guard.after_load(hf_loss_probe(model))
    assert report.ok and abs(report.loss.delta) < 0.01
    assert model.training  # eval mode only for the forward pass


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


def _guard_after_load(model, checkpoint, probe):
    """The guard's two steps on an already loaded model (the OLMo2 runs on the CPU)."""
    from flame_ext.guard.initial_load import RequestedLoad

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
