"""The future predictor head: the keys the converter writes are, by construction, the module's own, they
are listed as fresh in the manifest, and an HF model with the head attached loads the checkpoint strictly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.manifest import read_manifest
from flame_ext.model.future_predictor import ATTRIBUTE, FuturePredictorHead, attach_future_predictor


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_future_predictor_keys_are_the_modules_own_and_load_strictly(head_type, sharded_model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "step-0"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(sharded_model),
            checkpoint=str(out),
            include_future_predictor=True,
            future_predictor_head_type=head_type,
            reference=False,
            progress=False,
        )
    )
    hidden = AutoConfig.from_pretrained(sharded_model).hidden_size
    own = {f"{ATTRIBUTE}.{k}": tuple(v.shape) for k, v in FuturePredictorHead(hidden, head_type).state_dict().items()}
    found = read_dcp_metadata(out)
    head_keys = {k: spec.shape for k, spec in found.items() if k.startswith(ATTRIBUTE + ".")}
    assert head_keys == own
    assert read_manifest(out)["fresh_keys"] == sorted(own)
    assert read_manifest(out)["future_predictor"] == head_type

    # The training side: the HF model with the same head attached asks for exactly these keys.
    model = AutoModelForCausalLM.from_pretrained(sharded_model)
    attach_future_predictor(model, head_type)
    sd = model.state_dict()
    assert sorted(sd) == sorted(found)
    hf_values = {k: v.clone() for k, v in sd.items() if not k.startswith(ATTRIBUTE + ".")}
    for v in sd.values():
        v.fill_(float("nan"))  # whatever the load does not overwrite stays visibly wrong
    dcp.load(sd, checkpoint_id=str(out), planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)
    for key, value in sd.items():
        assert torch.isfinite(value).all(), f"{key} was not loaded"
        if key in hf_values:
            assert torch.equal(value, hf_values[key]), key
    # Fresh, not degenerate: each weight matrix has spread, as a default initialisation gives.
    for key in own:
        if key.endswith("weight"):
            assert sd[key].std() > 0, key


def test_future_predictor_in_nested_layout_lists_prefixed_fresh_keys(sharded_model, tmp_path):
    out = tmp_path / "nested"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(sharded_model),
            checkpoint=str(out),
            include_future_predictor=True,
            future_predictor_head_type="linear",
            layout="nested",
            reference=False,
            progress=False,
        )
    )
    fresh = read_manifest(out)["fresh_keys"]
    assert fresh == ["model.future_predictor.proj.bias", "model.future_predictor.proj.weight"]
    assert set(fresh) <= set(read_dcp_metadata(out))


def test_manifest_counts_the_head_in_total_parameters(sharded_model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "fp"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(sharded_model),
            checkpoint=str(out),
            include_future_predictor=True,
            future_predictor_head_type="mlp",
            reference=False,
            progress=False,
        )
    )
    hf_params = AutoModelForCausalLM.from_pretrained(sharded_model).num_parameters()
    head = FuturePredictorHead(AutoConfig.from_pretrained(sharded_model).hidden_size, "mlp")
    assert read_manifest(out)["total_parameters"] == hf_params + sum(p.numel() for p in head.parameters())


def test_head_rejects_unknown_type():
    with pytest.raises(ValueError, match="linear, mlp"):
        FuturePredictorHead(8, "conv")  # type: ignore[arg-type]
