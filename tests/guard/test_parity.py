"""``flame_ext.guard.parity``: what a host's load asks for (``split_request`` of a real state dict of a small
``nn.Module``) against a checkpoint's metadata, each decision shown as the problem a user reads."""

from __future__ import annotations

import torch
from torch import nn

from flame_ext.checks.recorded import RecordedChoices
from flame_ext.guard.parity import parity_problems
from flame_ext.guard.state import split_request
from flame_ext.io.specs import TensorSpec, dtype_name


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4, bias=False), nn.LayerNorm(4))


def _found(state: dict[str, torch.Tensor], prefix: str = "", dtype: torch.dtype | None = None) -> dict:
    return {prefix + k: TensorSpec(tuple(v.shape), dtype_name(dtype or v.dtype)) for k, v in state.items()}


def _check(request, found, **kw) -> tuple[list, dict, list]:
    counts: dict[str, int] = {}
    notes: list[str] = []
    problems = parity_problems(request, found, fresh=kw.pop("fresh", []), tied={}, counts=counts, notes=notes, **kw)
    return problems, counts, notes


def test_a_model_only_load_of_its_own_flat_checkpoint_has_no_problem():
    state = _model().state_dict()
    problems, counts, notes = _check(split_request(state), _found(state))
    assert problems == [] and notes == [] and counts["hf_params"] == counts["dcp_params"] == 40 + 16 + 8


def test_a_flat_checkpoint_under_a_full_nested_load_is_one_layout_error_and_each_missing_state_one_more():
    """torchtitan 0.1's full load: {"model": ..., "optimizer": ..., "train_state": ...}."""
    model = _model()
    request = split_request({"model": model, "optimizer": {"state": {}}, "train_state": {"step": 0}})
    assert request.model_prefix == "model." and request.other_states == ["optimizer", "train_state"]
    problems, counts, _ = _check(request, _found(model.state_dict()))
    kinds = [(p.kind, p.key) for p in problems]
    assert ("missing_key", "optimizer.*") in kinds and ("missing_key", "train_state.*") in kinds
    flat = [p for p in problems if p.kind == "layout" and "holds them flat" in p.detail]
    assert len(flat) == 1 and "initial_load_model_weights_only = true" in flat[0].hint
    assert counts["missing"] >= 2


def test_a_nested_checkpoint_under_a_model_only_load_is_an_error_whose_hint_says_if_it_was_chosen():
    state = _model().state_dict()
    (stock,), _, _ = _check(split_request(state), _found(state, "model."))
    assert stock.kind == "layout" and "flame's stock converter" in stock.hint
    (chosen,), _, _ = _check(split_request(state), _found(state, "model."), choices=RecordedChoices(layout="nested"))
    assert chosen.kind == "layout" and chosen.hint.startswith("converted with `--layout nested`")


def test_a_recorded_dtype_is_a_note_and_an_unrecorded_cast_one_warning():
    state = _model().state_dict()
    found = _found(state, dtype=torch.bfloat16)
    (warning,), counts, notes = _check(split_request(state), found)
    assert (warning.kind, warning.severity, warning.detail) == (
        "dtype_mismatch",
        "warning",
        "all 4 tensors: checkpoint bfloat16, model float32",
    )
    problems, counts, notes = _check(split_request(state), found, choices=RecordedChoices(dtype="bfloat16"))
    assert problems == [] and counts["dtype"] == 4 and len(notes) == 1 and "a load casts the 4 tensors" in notes[0]


def test_a_fresh_head_may_be_absent():
    model = _model()
    state = model.state_dict()
    found = _found({k: v for k, v in state.items() if not k.startswith("1.")})
    (missing,), _, _ = _check(split_request(state), found)
    assert (missing.kind, missing.key) == ("missing_key", "1.weight")
    assert _check(split_request(state), found, fresh=["1.weight"])[0] == []
