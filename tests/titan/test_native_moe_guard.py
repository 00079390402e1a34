"""The guard on torchtitan's own MoE models (qwen3 MoE; deepseek_v3: MLA, YaRN, a dense first layer, shared
experts) loaded from a flame-ext native conversion (``convert --layout torchtitan:support.titan_native
--titan-config qwen3_moe_tiny``, ``deepseek_v3_tiny``): every expert of a layer is one stacked
``[E, ...]`` tensor, the load-balancing bias is a fresh key, and attention is Flex (the document masks its
Trainer would build). The real 0.3 CheckpointManager verifies every loaded tensor against the fingerprints
recorded under the native keys and compares the model's step-0 loss with the HF reference; a checkpoint whose
one expert's slice of one stacked tensor was changed after conversion is stopped, naming that native key. Dense
qwen3 goes through the same checks (its damage: the first quarter of one q projection's rows reordered).

Slow: the first Flex forward pass on the CPU compiles (about 30 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.titan_hosts import build_manager, titan_generation

pytestmark = [
    pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3 API (state-dict adapters)"),
    pytest.mark.slow,
]

# The model's tensor count (the stacked experts and expert_bias_E among them); dense qwen3 beside its MoE.
TENSORS = {"qwen3_tiny": 25, "qwen3_moe_tiny": 29, "deepseek_v3_tiny": 43}
W1 = "layers.1.moe.routed_experts.inner_experts.w1_EFD"  # [experts, ffn, dim]: every expert's w1, stacked
WQ = "layers.1.attention.qkv_linear.wq.weight"  # dense qwen3: one q head's rows reordered instead
EXPERT = 2


def _damaged_key(function: str) -> str:
    return WQ if function == "qwen3_tiny" else W1


@pytest.fixture(scope="module", params=sorted(TENSORS))
def native(request, tiny_model, tmp_path_factory) -> tuple[str, Path]:
    import shutil

    from support import titan_native

    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    function = request.param
    root = tmp_path_factory.mktemp(f"native-moe-guard-{function}")
    hf = titan_native.write_hf_folder(function, root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_model / name, hf / name)  # byte-level: every id fits the 2048-token vocabulary
    dcp_dir = root / "dcp"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(hf), checkpoint=str(dcp_dir), layout="torchtitan:support.titan_native", titan_config=function,
            progress=False,
        )
    )  # fmt: skip
    return function, dcp_dir


def _model(function: str) -> torch.nn.Module:
    """The model as torchtitan's Trainer builds it (meta, ``to_empty``, ``init_weights``), in training mode."""
    from support import titan_native

    from flame_ext.titan.native_loss import build_native_like_trainer

    return build_native_like_trainer(titan_native.model_spec(function).model).train()


def test_every_loaded_tensor_of_the_moe_model_is_verified_and_the_loss_compared(native, tmp_path):
    function, dcp_dir = native
    model = _model(function)
    manager = build_manager(model, tmp_path, initial_load_path=str(dcp_dir), validate_initial_load=True,
                            initial_load_verify_values=True)  # fmt: skip
    assert manager.load() is True
    report = manager.initial_load_report
    total = len(model.state_dict())
    assert total == TENSORS[function] and _damaged_key(function) in model.state_dict()
    assert report.ok and f"values: {total} of {total} tensors verified" in " ".join(report.notes)
    assert "loss" in report.checked and abs(report.loss.delta) < 0.01 and report.loss.token_delta < 0.01


def test_one_experts_slice_changed_after_conversion_is_stopped_naming_the_native_key(native, tmp_path):
    from _models import rewrite_dcp

    from flame_ext.errors import InitialLoadValidationError

    function, dcp_dir = native
    key = _damaged_key(function)

    def damage_one_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = sd[key].clone()
        part = w[EXPERT] if key == W1 else w[: w.shape[0] // 4]  # one expert's slice; qwen3_tiny: q's first rows
        part.copy_(part.flip(0))  # those rows in another order; everything else untouched
        return {**sd, key: w}

    damaged = rewrite_dcp(dcp_dir, tmp_path / "damaged", damage_one_expert)
    manager = build_manager(_model(function), tmp_path / "run", initial_load_path=str(damaged),
                            validate_initial_load=True)  # fmt: skip
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    assert [p.key for p in info.value.report.errors if p.kind == "value_mismatch"] == [key]
    assert key in str(info.value)
