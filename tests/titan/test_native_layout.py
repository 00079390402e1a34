"""HF names given to a torchtitan model, and torchtitan's names given to an HF model: one ``layout`` problem
naming the cause and the command that fixes it, from the guard inside torchtitan 0.3's real
CheckpointManager and from ``flame-ext diagnose``, instead of every key listed as missing and unexpected
(the issue's first user report: 56 missing, 56 unexpected, "check the key names of the conversion")."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import report_json, run_cli
from support.titan_hosts import build_manager, titan_generation

pytestmark = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3.x's own llama3 model")

FIX = "flame-ext convert --model HF_MODEL --checkpoint OUT --layout torchtitan:llama3"


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """An HF Llama shaped like torchtitan's debug model, converted twice: with HF names (`flame-ext convert`,
    the default layout) and with torchtitan's own (its state-dict adapter, as its convert_from_hf does)."""
    from _llama import convert_with_adapter, debug_model_config, make_hf_llama

    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    root = tmp_path_factory.mktemp("native-layout")
    hf = make_hf_llama(root / "hf", tiny_model)
    hf_named = root / "hf-named" / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(hf), checkpoint=str(hf_named), progress=False))
    native = convert_with_adapter(hf, root / "native", debug_model_config())
    return {"hf": hf, "hf_named": hf_named, "native": native}


def test_the_guard_gives_the_layout_hint_with_the_fix_for_hf_names(checkpoints, tmp_path):
    from _llama import build_like_trainer, debug_model_config

    from flame_ext.errors import InitialLoadValidationError

    model = build_like_trainer(debug_model_config())
    before = model.state_dict()["norm.weight"].clone()
    manager = build_manager(model, tmp_path, initial_load_path=str(checkpoints["hf_named"]), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError, match="nothing was read") as info:
        manager.load()
    report = info.value.report
    (problem,) = report.errors
    assert problem.kind == "layout" and FIX in problem.hint
    assert "the model asks for torchtitan's own key names (57 keys" in problem.detail
    assert "the checkpoint has Hugging Face names" in problem.detail
    assert not any(p.kind in ("missing_key", "unexpected_key") for p in report.problems)
    assert report.counts["missing"] == 56 and report.counts["unexpected"] == 56  # lm_head.weight is in both
    assert model.state_dict()["norm.weight"].equal(before)


def test_diagnose_names_the_reverse_layout_for_a_native_checkpoint(checkpoints):
    proc = run_cli("diagnose", "--checkpoint", str(checkpoints["native"]), "--model", str(checkpoints["hf"]), "--json")
    assert proc.returncode == 1, proc.stderr
    report = report_json(proc.stdout)
    (problem,) = [p for p in report["problems"] if p["severity"] == "error"]
    assert problem["kind"] == "layout" and "the checkpoint has torchtitan's own names" in problem["detail"]
    assert "convert without --layout" in problem["hint"]
