"""The guard's value check (``guard.value_check``) on the embedded model and its real conversion: exact at the
trainer's dtype, the coverage stated in the note, the figures and the final line, and required coverage."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from flame_ext.errors import InitialLoadValidationError
from flame_ext.fingerprints.record import read_fingerprints
from flame_ext.guard import InitialLoadGuard, hf_loss_probe, split_request
from flame_ext.guard.options import GuardConfig
from flame_ext.guard.value_check import verify_loaded_values
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.manifest import MANIFEST_NAME, read_manifest


def _model(hf_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).train()


def _one_process(step, what):
    return step()


def _check(checkpoint, loaded, *, required=False, edit=None):
    manifest = read_manifest(checkpoint)
    if edit:
        edit(manifest["fingerprints"]["tensors"])
    fingerprints, _ = read_fingerprints(manifest)
    return verify_loaded_values(fingerprints, loaded, read_dcp_metadata(checkpoint), _one_process, required=required)


@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16, torch.float16])
def test_an_fp32_conversion_verifies_exactly_in_parameters_of_every_training_dtype(tiny_model, tiny_dcp, params):
    state = {k: v.to(params) for k, v in _model(tiny_model).state_dict().items()}  # what the load casts to
    check = _check(tiny_dcp, state)
    assert check.problems == [] and check.complete and check.label == "values"
    assert check.figures == {
        "initial_load/tensors_verified": 25,
        "initial_load/tensors_total": 25,
        "initial_load/value_mismatches": 0,
    }
    assert check.note.startswith("values: 25 of 25 tensors verified") and check.note.endswith(", 0 differ")
    k = "model.layers.0.self_attn.o_proj.weight"
    moved = dict(state, **{k: (state[k].view(torch.int16) + 1).view(params) if params != torch.float32 else state[k]})
    if params != torch.float32:  # one step of the trainer's dtype in every value: named, an error
        (problem,) = _check(tiny_dcp, moved).problems
        assert (problem.kind, problem.key, problem.severity) == ("value_mismatch", k, "error")


def test_fewer_fingerprints_than_loaded_tensors_is_a_warning_or_an_error_when_required(tiny_model, tiny_dcp, caplog):
    caplog.set_level(logging.WARNING, logger="flame_ext")
    state = _model(tiny_model).state_dict()
    gone = ["model.norm.weight", "lm_head.weight"]

    def drop(tensors):
        for k in gone:
            del tensors[k]

    check = _check(tiny_dcp, state, edit=drop)
    (problem,) = check.problems
    assert (problem.kind, problem.severity) == ("manifest", "warning")
    assert "no fingerprint recorded for 2 loaded tensors (e.g. lm_head.weight, model.norm.weight)" in problem.detail
    assert check.label == "values: 23 of 25" and check.note.startswith("values: 23 of 25 tensors verified")
    assert check.figures["initial_load/tensors_verified"] == 23 and check.figures["initial_load/tensors_total"] == 25
    assert any("no fingerprint recorded for 2 loaded tensors" in r.getMessage() for r in caplog.records)
    assert _check(tiny_dcp, state, edit=drop, required=True).problems[0].severity == "error"
    assert _check(tiny_dcp, state, required=True).problems == []  # all 25 recorded: nothing to say


def _guard_run(tiny_model, checkpoint, **config):
    model = _model(tiny_model)
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True, **config), str(checkpoint), [model])
    guard.before_load(split_request(model.state_dict()), lambda: read_dcp_metadata(checkpoint))
    return guard.after_load(hf_loss_probe(model), loaded=model.state_dict())


def test_a_record_for_other_keys_verifies_nothing_and_never_says_values_validated(
    tiny_model, tiny_dcp, tmp_path, caplog
):
    """Fingerprints none of whose keys match the checkpoint: unset, the load passes with the warning and the final
    line says 'values: 0 of 25'; required (initial_load_verify_values = true), it is stopped."""
    checkpoint = tmp_path / "dcp"
    shutil.copytree(tiny_dcp, checkpoint)
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    tensors = manifest["fingerprints"]["tensors"]
    manifest["fingerprints"]["tensors"] = {f"other_model.{k}": v for k, v in tensors.items()}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="flame_ext")
    report = _guard_run(tiny_model, checkpoint)
    assert report.ok and [p.kind for p in report.warnings] == ["manifest"]
    detail = report.warnings[0].detail
    assert "values: 0 of 25 tensors verified: no fingerprint recorded for 25 loaded tensors" in detail
    final = caplog.messages[-1]
    assert "validated (keys, manifest, values: 0 of 25, buffers, loss: " in final and "values," not in final
    with pytest.raises(InitialLoadValidationError, match="no fingerprint recorded for 25 loaded tensors") as info:
        _guard_run(tiny_model, checkpoint, initial_load_verify_values=True)
    assert [p.kind for p in info.value.report.errors] == ["manifest"]
