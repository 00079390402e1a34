"""flash-linear-attention families through convert, to-hf and diagnose, on the CPU.

Each family is a tiny model built from its fla config (``fla_models.FAMILIES``). Their forward passes need
a GPU (Triton), so on this machine convert records why there is no reference loss, and diagnose says the
loss was not measured while every other pass runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _models import dcp_tensors, rewrite_dcp
from fla_models import FAMILIES, ROTARY, fla_config, swap_first_two_layers
from safetensors.torch import load_file

from flame_ext.commands.diagnose import DiagnoseOptions, diagnose
from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.manifest import read_manifest

# slow: every fla family through convert, diagnose and to-hf (make test-fast leaves it out).
pytestmark = pytest.mark.slow

family = pytest.mark.parametrize("name", sorted(FAMILIES))


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@family
def test_convert_then_to_hf_is_bit_exact(name, fla_hf, fla_dcp, tmp_path):
    dcp_dir, summary = fla_dcp(name)
    manifest = read_manifest(dcp_dir)
    assert manifest["source"]["model_type"] == name
    assert manifest["reference"] is None and "Triton" in manifest["reference_unavailable"]
    note = next(n for n in summary.notes if n.startswith("no reference loss recorded"))
    assert "flame-ext reference --model" in note and "initial_load_reference" in note
    out = tmp_path / "hf"
    convert_dcp_to_hf(ToHFOptions(checkpoint=str(dcp_dir), config=str(fla_hf(name)), out=str(out), progress=False))
    source, back = hf_weights(fla_hf(name)), hf_weights(out)
    assert sorted(source) == sorted(back)
    assert all(same_bytes(source[k], back[k]) for k in source)
    assert json.loads((out / "config.json").read_text())["model_type"] == name


@family
def test_nested_layout_bfloat16_and_future_predictor(name, fla_hf, tmp_path):
    out = tmp_path / "nested"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(fla_hf(name)),
            checkpoint=str(out),
            layout="nested",
            dtype="bfloat16",
            include_future_predictor=True,
            future_predictor_head_type="mlp",
            reference=False,
            progress=False,
        )
    )
    source = hf_weights(fla_hf(name))
    written = dcp_tensors(out)
    fresh = set(read_manifest(out)["fresh_keys"])
    assert fresh and all(k.startswith("model.future_predictor.") for k in fresh)
    assert set(written) == {"model." + k for k in source} | fresh
    for key, value in source.items():
        assert same_bytes(written["model." + key], value.to(torch.bfloat16)), key


@family
def test_diagnose_passes_the_healthy_checkpoint_with_no_buffer_warning(name, fla_hf, fla_dcp):
    dcp_dir, _ = fla_dcp(name)
    report = diagnose(DiagnoseOptions(checkpoint=str(dcp_dir), model=str(fla_hf(name)), values=True, loss=True))
    assert report.ok and report.problems == [], report.render_text()
    assert report.loss is None
    assert any(n.startswith("loss not measured:") and "Triton" in n for n in report.notes)
    assert any(n.startswith("values: ") and "compared with the HF source" in n for n in report.notes)
    buffers_set = [n for n in report.notes if "non-persistent buffer(s) from the config" in n]
    assert bool(buffers_set) == (name in ROTARY)  # fla's rotary inv_freq, recomputed through reset_parameters


@family
def test_diagnose_finds_two_swapped_layers(name, fla_hf, fla_dcp, tmp_path):
    dcp_dir, _ = fla_dcp(name)
    swapped = rewrite_dcp(dcp_dir, tmp_path / "swapped", swap_first_two_layers)
    report = diagnose(DiagnoseOptions(checkpoint=str(swapped), model=str(fla_hf(name)), values=True))
    assert not report.ok
    layer_keys = {k for k in dcp_tensors(dcp_dir) if ".layers." in k}
    differ = {k for k in layer_keys if not torch.equal(*(dcp_tensors(swapped)[k], dcp_tensors(dcp_dir)[k]))}
    # One cause, one error counting the tensors of both layers that hold each other's values; a tensor whose
    # twin is not exactly one key (rwkv7's layer-0-only tensors) is named on its own.
    mismatched = [p for p in report.errors if p.kind == "value_mismatch"]
    (folded,) = [p for p in mismatched if p.key is None]
    named = {p.key for p in mismatched if p.key is not None}
    count = int(re.search(r" are swapped: (\d+) tensors hold each other's values", folded.detail).group(1))
    assert differ and named <= differ and count + len(named) == len(differ)
    assert {p.kind for p in report.errors} == {"value_mismatch"}


def test_config_parity_reads_fla_field_names(fla_hf, tmp_path):
    """A kernel switch is no difference, a head layout is an error, a loss term a warning."""
    hf_dir = fla_hf("gla")
    dcp_dir = tmp_path / "dcp"
    convert_hf_to_dcp(ConvertOptions(model=str(hf_dir), checkpoint=str(dcp_dir), reference=False, progress=False))
    train = json.loads((hf_dir / "config.json").read_text())
    train.update(attn_mode="fused_recurrent", fuse_norm=not train["fuse_norm"], expand_k=1.0, use_l2warp=True)
    (tmp_path / "train.json").write_text(json.dumps(train))
    report = diagnose(
        DiagnoseOptions(checkpoint=str(dcp_dir), model=str(hf_dir), train_config=str(tmp_path / "train.json"))
    )
    found = {p.key: p.severity for p in report.problems if p.kind == "config_mismatch"}
    assert found == {"expand_k": "error", "use_l2warp": "warning"}


def test_every_tested_family_builds_from_its_fla_config():
    """The families are fla's own classes (not transformers' namesakes: fla registers mamba2 and bitnet over them)."""
    from transformers import AutoModelForCausalLM

    for name in FAMILIES:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(fla_config(name))
        assert type(model).__module__.startswith("fla.models."), (name, type(model).__module__)
