"""A training checkpoint against its save-time record, offline: ``flame-ext diagnose --checkpoint step-N --values``
(no HF model, no trainer), on a step folder written by DCP with the record the guarded manager writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.cli import report_json, run_cli

from flame_ext.cli import main
from flame_ext.guard.save_record import record_save
from flame_ext.io.training_state import as_state_dicts


def training_state(scale: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, generator=gen)
    return {
        "model": {"layer.weight": weight, "norm.weight": torch.ones(4, dtype=torch.bfloat16)},
        "optimizer": {"state": {"layer.weight": {"exp_avg": weight * 0.01 * scale, "step": torch.tensor(3.0)}}},
        "lr_scheduler": {"last_epoch": 3},
    }


@pytest.fixture
def step3(tmp_path) -> Path:
    folder = tmp_path / "checkpoint" / "step-3"
    saved = as_state_dicts(training_state())
    record = record_save(saved, step=3, checkpoint=str(folder))
    dcp.save(saved, checkpoint_id=str(folder), no_dist=True)
    record.write_when_saved(None)
    return folder


def damaged(step3: Path, tmp_path: Path) -> Path:
    """The same step with one exp_avg halved on disk, the record kept."""
    out = tmp_path / "damaged" / "step-3"
    dcp.save(as_state_dicts(training_state(scale=0.5)), checkpoint_id=str(out), no_dist=True)
    shutil.copy2(step3 / "flame_ext.json", out / "flame_ext.json")
    return out


def test_a_step_folder_is_verified_against_its_record_without_an_hf_model(step3, capsys):
    assert main(["diagnose", "--checkpoint", str(step3), "--values"]) == 0
    out = capsys.readouterr().out
    assert "against its save-time record" in out
    assert "values: 4 of 4 tensors verified against the save-time record of step 3" in out
    assert "verdict: OK" in out


def test_a_tensor_changed_after_the_save_is_named_with_its_kind(step3, tmp_path):
    proc = run_cli("diagnose", "--checkpoint", str(damaged(step3, tmp_path)), "--values", "--json")
    assert proc.returncode == 1, proc.stderr
    report = report_json(proc.stdout)
    (problem,) = [p for p in report["problems"] if p["severity"] == "error"]
    assert problem["key"] == "optimizer.state.layer.weight.exp_avg"
    assert "at the save of step 3 (optimizer state)" in problem["detail"] and "scaled by 0.5" in problem["detail"]


def test_keys_the_save_wrote_and_the_folder_lacks_are_errors(step3, tmp_path, capsys):
    out = tmp_path / "short" / "step-3"
    state = as_state_dicts(training_state())
    del state["optimizer"]["state"]["layer.weight"]["step"]
    dcp.save(state, checkpoint_id=str(out), no_dist=True)
    shutil.copy2(step3 / "flame_ext.json", out / "flame_ext.json")
    assert main(["diagnose", "--checkpoint", str(out)]) == 1
    text = capsys.readouterr().out
    assert "missing_key optimizer.state.layer.weight.step" in text and "(optimizer state)" in text
    assert "values not checked (add --values)" in text
