"""A resume against the save-time record, host-independent: a real DCP save and load of a small state."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from flame_ext.guard import GuardConfig, InitialLoadValidationError, LoadCapture, ResumeValidationError, verify_resume
from flame_ext.guard.save_record import record_save
from flame_ext.io.training_state import as_state_dicts, flatten_state, group_of

ENTRIES = ["model", "lr_scheduler"]
ON = GuardConfig(validate_initial_load=True)


class Scheduler:
    def __init__(self, epoch: int) -> None:
        self.epoch, self.given = epoch, None

    def state_dict(self) -> dict:
        return {"last_epoch": self.epoch, "base_lrs": [0.001]}

    def load_state_dict(self, sd: dict) -> None:
        self.given, self.epoch = sd, sd["last_epoch"]


def save(folder: Path, model: nn.Module, epoch: int, *, record: bool = True) -> None:
    saved = as_state_dicts({"model": model.state_dict(), "lr_scheduler": Scheduler(epoch)})
    pending = record_save(saved, step=1, checkpoint=str(folder)) if record else None
    dcp.save(saved, checkpoint_id=str(folder), no_dist=True)
    if pending is not None:
        pending.write_when_saved(None)


def resume(folder: Path, config: GuardConfig = ON):
    model, scheduler, capture = nn.Linear(3, 4), Scheduler(0), LoadCapture()
    states = capture.wrap({"model": model.state_dict(), "lr_scheduler": scheduler}, live=("model",))
    dcp.load(states, checkpoint_id=str(folder), no_dist=True)
    assert scheduler.given is not None  # the wrapper passed the load through

    def loaded() -> dict:
        return {**flatten_state({"model": model.state_dict()}), **capture.read(["lr_scheduler"])}

    return verify_resume(config, str(folder), [model], loaded, groups=lambda k: group_of(k, ENTRIES))


@pytest.fixture
def step1(tmp_path) -> Path:
    torch.manual_seed(0)
    save(tmp_path / "step-1", nn.Linear(3, 4), epoch=5)
    return tmp_path / "step-1"


def test_a_resume_of_what_was_saved_passes_and_states_its_coverage(step1):
    report, figures = resume(step1)
    assert report.ok and report.checked == ["buffers", "values"]
    assert any(
        "values: 2 of 2 tensors verified" in n and "2 of 2 other states by digest; 0 differ" in n for n in report.notes
    )
    assert (figures["resume/tensors_verified"], figures["resume/value_mismatches"]) == (2, 0)


def test_a_tensor_changed_on_disk_is_named_with_its_kind(step1):
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    with torch.no_grad():
        model.weight[0] *= -1
    save(step1, model, epoch=5, record=False)  # the data rewritten, the record kept
    with pytest.raises(ResumeValidationError) as info:
        resume(step1)
    assert isinstance(info.value, InitialLoadValidationError)
    (problem,) = info.value.report.errors
    assert problem.key == "model.weight" and "at the save of step 1 (model)" in problem.detail


def test_a_state_changed_on_disk_is_named_by_its_digest(step1):
    torch.manual_seed(0)
    save(step1, nn.Linear(3, 4), epoch=6, record=False)
    with pytest.raises(ResumeValidationError) as info:
        resume(step1)
    (problem,) = info.value.report.errors
    assert problem.key == "lr_scheduler.last_epoch" and "(other state): sha256" in problem.detail


def test_without_a_record_the_resume_warns_and_passes(tmp_path, caplog):
    save(tmp_path / "step-1", nn.Linear(3, 4), epoch=5, record=False)
    with caplog.at_level(logging.WARNING):
        report, _ = resume(tmp_path / "step-1")
    assert report.ok and report.checked == ["buffers"]
    assert any("could not be verified (no save-time record:" in r.getMessage() for r in caplog.records)


def test_an_unreadable_record_is_an_error_naming_the_file(step1):
    (step1 / "flame_ext.json").write_text("{not json")
    with pytest.raises(ResumeValidationError) as info:
        resume(step1)
    (problem,) = info.value.report.errors
    assert problem.kind == "manifest" and problem.key.endswith("flame_ext.json")


def test_verify_resumes_false_skips_the_values(step1):
    save(step1, nn.Linear(3, 4), epoch=9, record=False)
    report, figures = resume(step1, GuardConfig(validate_initial_load=True, verify_resumes=False))
    assert report.ok and report.checked == ["buffers"] and "resume/tensors_verified" not in figures
