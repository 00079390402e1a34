"""``flame-ext diagnose`` on a checkpoint converted with ``--layout torchtitan:llama3``: keys, shapes and dtypes
in torchtitan's key space; values against the HF source mapped through llama3's adapter (``--model``) or
against the fingerprints recorded at conversion (no ``--model``); ``--loss`` with torchtitan's own Llama3Model
on the CPU against the HF reference; the torchtitan config against the HF config. A permuted q head
(right shape, torchtitan's key) is found by each pass that can see it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import rewrite_dcp
from support.cli import report_json, run_cli
from support.titan_hosts import titan_generation

pytestmark = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3.x's own llama3 model")
# The native conversion (`convert --layout torchtitan:<module>`) comes with flame_ext.titan.native.
pytest.importorskip("flame_ext.titan.native", reason="convert --layout torchtitan:<module> not in this tree")

Q = "layers.1.attention.qkv_linear.wq.weight"


@pytest.fixture(scope="module")
def native(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """An HF Llama shaped like torchtitan's llama3 debugmodel, converted to torchtitan's names by flame-ext."""
    from _llama import make_hf_llama

    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    root = tmp_path_factory.mktemp("native-diagnose")
    hf = make_hf_llama(root / "hf", tiny_model)
    out = root / "dcp" / "step-0"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(hf), checkpoint=str(out), layout="torchtitan:llama3", titan_config="llama3_debugmodel",
            progress=False,
        )
    )  # fmt: skip
    return {"hf": hf, "dcp": out, "root": root}


def diagnose(*args: str) -> tuple[int, dict]:
    proc = run_cli("diagnose", *args, "--json", timeout=900)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, report_json(proc.stdout)


@pytest.mark.slow  # diagnose of a native checkpoint in fresh processes (22 CPU-s)
def test_a_native_checkpoint_passes_every_pass_against_its_hf_source(native):
    code, report = diagnose("--checkpoint", str(native["dcp"]), "--model", str(native["hf"]), "--values", "--loss")
    assert code == 0, [p for p in report["problems"] if p["severity"] == "error"]
    assert report["counts"]["missing"] == 0 and report["counts"]["unexpected"] == 0
    notes = " ".join(report["notes"])
    assert "tensors compared with the HF source mapped by Llama3StateDictAdapter" in notes
    assert "loss of torchtitan's own llama3 model (Llama3Model, CPU)" in notes
    assert abs(report["loss"]["delta"]) < 1e-3


def test_without_the_source_values_are_checked_against_the_recorded_fingerprints(native):
    code, report = diagnose("--checkpoint", str(native["dcp"]), "--values")
    assert code == 0, report["problems"]
    assert any("verified against the fingerprints recorded at conversion, in torchtitan's key space" in n
               for n in report["notes"])  # fmt: skip


@pytest.mark.slow  # diagnose of a native checkpoint in fresh processes (20 CPU-s)
def test_a_permuted_q_head_is_named_by_its_native_key(native):
    def permute(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = sd[Q].clone().view(16, 16, -1)
        sd[Q] = w[[1, 0, *range(2, 16)]].reshape(256, -1)
        return sd

    damaged = rewrite_dcp(native["dcp"], native["root"] / "permuted", permute)
    code, report = diagnose("--checkpoint", str(damaged), "--model", str(native["hf"]), "--values", "--loss")
    assert code == 1
    errors = {(p["kind"], p["key"]) for p in report["problems"] if p["severity"] == "error"}
    assert ("value_mismatch", Q) in errors and ("loss_gap", None) in errors
    _, recorded = diagnose("--checkpoint", str(damaged), "--values")
    assert ("value_mismatch", Q) in {(p["kind"], p["key"]) for p in recorded["problems"]}


def test_a_rope_theta_the_torchtitan_config_does_not_have_is_a_config_mismatch(native, tmp_path):
    """The HF model says 1e6, torchtitan's llama3 debugmodel builds 500000: both values named."""
    hf = tmp_path / "hf"
    shutil.copytree(native["hf"], hf)
    config = json.loads((hf / "config.json").read_text())
    config["rope_theta"] = 1000000.0
    config.get("rope_parameters", {}).update(rope_theta=1000000.0)
    (hf / "config.json").write_text(json.dumps(config))
    code, report = diagnose("--checkpoint", str(native["dcp"]), "--model", str(hf))
    assert code == 1
    (problem,) = [p for p in report["problems"] if p["kind"] == "config_mismatch"]
    assert problem["key"] == "rope_theta" and "has 500000" in problem["detail"] and "1000000.0" in problem["detail"]
