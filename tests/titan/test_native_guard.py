"""The guard on torchtitan's own llama3 loaded from a flame-ext native conversion (``convert --layout
torchtitan:llama3``): the real 0.3 CheckpointManager verifies every loaded tensor against the fingerprints
recorded under the native keys, compares torchtitan's step-0 loss with the HF reference, and stops a checkpoint
whose one q head was permuted after conversion, naming the native key. With ``initial_load_in_hf`` and the
native manifest as the reference, every tensor is verified too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.titan_hosts import build_manager, build_manager03_hf, titan_generation

pytestmark = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3 API (state-dict adapters)")

Q = "layers.1.attention.qkv_linear.wq.weight"


@pytest.fixture(scope="module")
def native(tiny_model, tmp_path_factory) -> dict[str, Path]:
    from _llama import make_hf_llama

    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    root = tmp_path_factory.mktemp("native-guard")
    hf = make_hf_llama(root / "hf", tiny_model, n_layers=2)
    dcp_dir = root / "dcp"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(hf), checkpoint=str(dcp_dir), layout="torchtitan:support.titan_native",
            titan_config="llama3_tiny", progress=False,
        )
    )  # fmt: skip
    return {"hf": hf, "dcp": dcp_dir, "root": root}


def _model():
    from _llama import build_like_trainer, debug_model_config

    config = debug_model_config(n_layers=2)
    return config, build_like_trainer(config)


def test_every_loaded_tensor_is_verified_and_the_loss_compared(native, tmp_path):
    _, model = _model()
    manager = build_manager(model, tmp_path, initial_load_path=str(native["dcp"]), validate_initial_load=True,
                            initial_load_verify_values=True)  # fmt: skip
    assert manager.load() is True
    report = manager.initial_load_report
    total = len(model.state_dict())
    assert report.ok and f"values: {total} of {total} tensors verified" in " ".join(report.notes)
    assert "loss" in report.checked and abs(report.loss.delta) < 0.01


def test_a_permuted_q_head_is_stopped_naming_the_native_key(native, tmp_path):
    from _models import rewrite_dcp

    from flame_ext.errors import InitialLoadValidationError

    def permute_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = sd[Q].clone()
        head = q.shape[0] // 16
        q[:head] = q[:head].flip(0)  # one head's rows in another order: the rotary pairs of that head are mixed up
        return {**sd, Q: q}

    damaged = rewrite_dcp(native["dcp"], tmp_path / "damaged", permute_head)
    _, model = _model()
    manager = build_manager(model, tmp_path / "run", initial_load_path=str(damaged), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    assert [p.key for p in info.value.report.errors if p.kind == "value_mismatch"] == [Q]


def test_an_hf_load_against_the_native_manifest_verifies_every_tensor(native, tmp_path):
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    config, model = _model()
    manager = build_manager03_hf(
        model, tmp_path, native["hf"], Llama3StateDictAdapter(config, str(native["hf"])), validate_initial_load=True,
        initial_load_reference=str(native["dcp"] / "flame_ext.json"), initial_load_verify_values=True,
    )  # fmt: skip
    assert manager.load() is True
    total = len(model.state_dict())
    assert f"values: {total} of {total} tensors verified" in " ".join(manager.initial_load_report.notes)
