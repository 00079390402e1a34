"""What a user reads first, run as a user runs it: `flame-ext convert` then `flame-ext diagnose` in fresh
processes on the embedded tiny model, the text and the JSON as printed.

- a choice the manifest records (`convert --layout nested`, `--dtype bfloat16`) is a note, not a problem;
- flame's stock nested checkpoint (no manifest) is one error with its count, not ~80 lines;
- a checkpoint saved from a model whose weights were never loaded (meta + to_empty()) is named so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support.cli import report_json, run_cli

TENSORS = 25  # the embedded OLMo2's tensors


def _convert(model: Path, out: Path, *options: str) -> Path:
    proc = run_cli("convert", "--model", str(model), "--checkpoint", str(out), "--no-reference", *options)
    assert proc.returncode == 0, proc.stderr
    return out


def _diagnose(checkpoint: Path, *options: str) -> tuple[int, list[str], dict]:
    """Exit code, the text report's lines, the JSON report (schema-checked)."""
    text = run_cli("diagnose", "--checkpoint", str(checkpoint), *options)
    as_json = run_cli("diagnose", "--checkpoint", str(checkpoint), *options, "--json")
    assert text.returncode == as_json.returncode and text.stderr == "", text.stderr
    return text.returncode, text.stdout.splitlines(), report_json(as_json.stdout)


@pytest.fixture(scope="module")
def nested(tiny_model, tmp_path_factory) -> Path:
    return _convert(tiny_model, tmp_path_factory.mktemp("nested") / "step-0", "--layout", "nested")


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_a_nested_conversion_is_the_choice_its_manifest_records(nested):
    code, lines, data = _diagnose(nested)
    assert code == 0
    assert lines[1:] == [
        "parameters: HF 492,928  checkpoint 492,928   missing 0  unexpected 0  shape 0  dtype 0",
        lines[2],  # the model used, recorded in flame_ext.json
        "note: layout nested, chosen at conversion (`convert --layout nested`, recorded in flame_ext.json): the 25 "
        "model keys sit under 'model.', as a full training-state load (torchtitan 0.1) asks for them; they are "
        "compared under their flat names",
        "verdict: OK (0 errors, 0 warnings; values and loss not checked (add --values --loss))",
    ]
    assert data["ok"] and data["problems"] == [] and data["counts"]["missing"] == 0


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_a_bf16_conversion_is_a_note_not_a_permanent_warning(tiny_model, tmp_path):
    bf16 = _convert(tiny_model, tmp_path / "step-0", "--dtype", "bfloat16")
    code, lines, data = _diagnose(bf16)
    assert code == 0 and not [line for line in lines if "WARNING" in line]
    note = (
        "dtype bfloat16, chosen at conversion (`convert --dtype bfloat16`, recorded in flame_ext.json): the model "
        f"is float32, and a load casts the {TENSORS} tensors"
    )
    assert f"note: {note}" in lines and lines[-1].startswith("verdict: OK (0 errors, 0 warnings;")
    assert data["warnings"] == 0 and data["problem_kinds"]["dtype_mismatch"] == 0 and note in data["notes"]
    assert data["counts"]["dtype"] == TENSORS  # still counted: every tensor is stored in another dtype


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_flames_stock_nested_checkpoint_is_one_error_with_its_count(nested, tiny_model, tmp_path):
    """No manifest (flame's own converter): nothing records the choice, so the nesting is an error for a
    model-only load; one error, root cause first, the 25 missing and 25 unexpected keys counted in it."""
    stock = tmp_path / "stock"
    shutil.copytree(nested, stock)
    (stock / "flame_ext.json").unlink()
    code, lines, data = _diagnose(stock, "--model", str(tiny_model))
    assert code == 1
    errors = [line for line in lines if line.startswith("  ERROR")]
    assert errors == [
        "  ERROR   layout: 25 of 25 keys sit under an extra 'model.' prefix (e.g. model.model.embed_tokens.weight); "
        "so 25 keys are missing under their own names and 25 unexpected under these (not listed one by one)"
    ]
    assert len(lines) == 7 and lines[-1] == "verdict: FAILED (1 error, 1 warning)"  # was ~80 lines
    assert [p["kind"] for p in data["problems"]] == ["layout", "manifest"]
    assert data["problem_kinds"]["missing_key"] == data["problem_kinds"]["unexpected_key"] == 0
    assert (data["counts"]["missing"], data["counts"]["unexpected"]) == (25, 25)


def _save_never_loaded(model_dir: Path, out: Path, manifest_from: Path) -> Path:
    """What a trainer saves when it builds on meta, materialises with to_empty() and skips the load."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.to_empty(device="cpu")
    dcp.save(model.state_dict(), checkpoint_id=str(out))
    shutil.copy(manifest_from / "flame_ext.json", out / "flame_ext.json")
    return out


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_a_checkpoint_whose_weights_were_never_loaded_is_named_so(tiny_model, tiny_dcp, tmp_path):
    never = _save_never_loaded(tiny_model, tmp_path / "never", tiny_dcp)
    for options in ((), ("--model", str(tiny_model))):  # against the recorded fingerprints, then the HF source
        code, lines, data = _diagnose(never, "--values", *options)
        assert code == 1 and "changed after it was written" not in "\n".join(lines)
        (error,) = [line for line in lines if line.startswith("  ERROR")]
        assert error.startswith(f"  ERROR   value_mismatch: never loaded: all {TENSORS} tensors hold values unrelated")
        assert "to_empty()" in error
        (problem,) = data["problems"]
        assert problem["key"] is None and "never loaded" in problem["detail"]
        assert "load the converted checkpoint before saving" in problem["hint"]
