"""``diagnose --loss`` on a torchtitan-native checkpoint: torchtitan's own llama3 class on the CPU, on a DCP
written by torchtitan's adapter from an HF Llama, against that HF Llama's reference loss. Equal on the same
weights; a permuted q head (right shape, wrong layout) is a loss gap. And torchtitan's deepseek_v3 on
flame-ext's conversion against the reference recorded there: the HF config written for the torchtitan
config makes transformers compute the same function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _models import rewrite_dcp
from support.titan_hosts import titan_generation

pytestmark = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3.x's own models")

Q = "layers.1.attention.qkv_linear.wq.weight"


@pytest.fixture(scope="module")
def native(tiny_model, tmp_path_factory) -> dict:
    from _llama import convert_with_adapter, debug_model_config, make_hf_llama
    from test_titan03 import reference_file

    root = tmp_path_factory.mktemp("native-loss")
    hf = make_hf_llama(root / "hf", tiny_model)
    reference = json.loads(reference_file(hf, root / "reference.json").read_text())["reference"]
    return {
        "dcp": convert_with_adapter(hf, root / "dcp", debug_model_config()),
        "reference": reference,
        "config": debug_model_config(),
        "root": root,
    }


def loss_of(native: dict, folder: Path):
    from flame_ext.io.dcp import read_dcp_metadata
    from flame_ext.titan.native_loss import check_native_loss

    found = read_dcp_metadata(folder)
    return check_native_loss(
        native["config"],
        folder,
        found,
        {k: k for k in found},
        native["reference"],
        "the HF reference",
        module="llama3",
        threshold=0.01,
        token_threshold=0.01,
    )


def test_torchtitans_model_on_the_adapters_checkpoint_has_the_hf_loss(native):
    result = loss_of(native, native["dcp"])
    assert result.problems == [], result.problems[0].detail
    assert abs(result.comparison.delta) < 1e-3 and result.comparison.token_delta < 1e-3
    assert any("torchtitan's own llama3 model (Llama3Model, CPU)" in n for n in result.notes)


def test_a_permuted_q_head_is_a_loss_gap(native):
    def permute(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = sd[Q].clone().view(16, 16, -1)  # 16 heads of 16 rows
        sd[Q] = w[[1, 0, *range(2, 16)]].reshape(256, -1)
        return sd

    damaged = rewrite_dcp(native["dcp"], native["root"] / "permuted", permute)
    result = loss_of(native, damaged)
    (problem,) = result.problems
    assert problem.kind == "loss_gap" and problem.detail.startswith("torchtitan llama3 loss on the reference batch")


@pytest.fixture(scope="module")
def deepseek(tiny_model, tmp_path_factory) -> Path:
    """deepseek_v3 (MLA, YaRN, a dense layer, sigmoid-routed experts with shared experts) converted by flame-ext
    with its default HF reference loss, from an HF folder written through torchtitan's own adapter."""
    import shutil

    from support import titan_native

    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    root = tmp_path_factory.mktemp("native-loss-deepseek")
    hf = titan_native.write_hf_folder("deepseek_v3_tiny", root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_model / name, hf / name)  # byte-level: every id fits the 2048-token vocabulary
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(hf), checkpoint=str(root / "dcp"), layout="torchtitan:support.titan_native",
            titan_config="deepseek_v3_tiny", progress=False,
        )
    )  # fmt: skip
    return root / "dcp"


@pytest.mark.slow
def test_torchtitans_deepseek_v3_has_the_hf_reference_loss(deepseek):
    """The HF reference (transformers' DeepseekV3 on the config.json written for the torchtitan config) and
    torchtitan's own forward compute the same function: routing groups, scoring, YaRN and MLA agree."""
    from support import titan_native

    from flame_ext.io.dcp import read_dcp_metadata
    from flame_ext.titan.native_loss import check_native_loss

    reference = json.loads((deepseek / "flame_ext.json").read_text())["reference"]
    found = read_dcp_metadata(deepseek)
    result = check_native_loss(
        titan_native.model_spec("deepseek_v3_tiny").model,
        deepseek,
        found,
        {k: k for k in found},
        reference,
        "the HF reference",
        module="deepseek_v3",
        threshold=0.01,
        token_threshold=0.01,
    )
    assert result.problems == [], result.problems[0].detail
    # torchtitan's grouped experts compute in bfloat16 (the HF reference in float32): per token, not bit-equal
    assert abs(result.comparison.delta) < 1e-3 and result.comparison.token_delta < 1e-3
    assert any("(DeepSeekV3Model, CPU)" in n for n in result.notes)
