"""The guard's value check across dtypes, through the installed torchtitan's real ``ValidatingCheckpointManager``:
fp32 / bf16 conversion x fp32 / bf16 trainer parameters x re-saved at the other dtype. Every faithful
combination verifies exactly (25 of 25, 0 differ); a value changed below the stored dtype's resolution is named;
a record without the trainer's dtype says "not verified", never a mismatch.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _models import hf_like_trainer
from support.titan_hosts import build_manager, titan_generation

sys.path.insert(0, str(Path(__file__).parents[1]))
from diagnose.conftest import convert, load_all, one_thread, save_dcp  # noqa: E402

from flame_ext.errors import InitialLoadValidationError  # noqa: E402
from flame_ext.io.manifest import MANIFEST_NAME  # noqa: E402

pytestmark = pytest.mark.skipif(
    titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OTHER = {"fp32": "bf16", "bf16": "fp32"}
O0 = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def conversions(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("value-dtypes")
    return {
        "fp32": convert(tiny_model, root / "fp32"),
        "bf16": convert(tiny_model, root / "bf16", dtype="bfloat16"),
    }


def _resaved(conversion: Path, state: dict[str, torch.Tensor], out: Path) -> Path:
    """``state`` written with torch's own dcp.save, the conversion's manifest kept (a re-save by another tool)."""
    return save_dcp(state, out, manifest_from=conversion)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _load(hf_dir: Path, checkpoint: Path, base: Path, params: torch.dtype, **guard):
    model = hf_like_trainer(hf_dir).to(params)
    manager = build_manager(
        model,
        base,
        initial_load_path=str(checkpoint),
        validate_initial_load=True,
        initial_load_max_loss_delta=0.5,  # a bf16 forward against the fp32 reference: the values are the subject
        **guard,
    )
    with one_thread():
        assert manager.load()
    return manager.initial_load_report, model


def _values_note(report) -> str:
    return next(n for n in report.notes if n.startswith("values: "))


@pytest.mark.parametrize("resaved", [False, True], ids=["as converted", "re-saved at the other dtype"])
@pytest.mark.parametrize("params", ["fp32", "bf16"])
@pytest.mark.parametrize("converted", ["fp32", "bf16"])
def test_every_faithful_dtype_combination_verifies_exactly(
    converted, params, resaved, conversions, tiny_model, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="flame_ext")
    checkpoint = conversions[converted]
    if resaved:
        state = _cast(load_all(checkpoint), DTYPES[OTHER[converted]])
        checkpoint = _resaved(checkpoint, state, tmp_path / "resaved")
    report, _ = _load(tiny_model, checkpoint, tmp_path / "run", DTYPES[params])
    assert report.ok, report.render_text()
    assert not [p for p in report.problems if p.kind in ("value_mismatch", "manifest")], report.render_text()
    assert _values_note(report).startswith("values: 25 of 25 tensors verified") and " 0 differ" in _values_note(report)
    assert "validated (keys, manifest, values, buffers, loss" in caplog.messages[-1]


def test_an_fp32_checkpoint_moved_below_half_a_bf16_step_from_a_bf16_record_is_named(conversions, tiny_model, tmp_path):
    """The values round back to the recorded bf16 ones, so rounding the live values first would pass them. They
    are compared as they are: in fp32 parameters the moved tensor is named. In bf16 parameters the load rounds
    them back, the trainer holds exactly the recorded values, and the load passes: what is trained is right."""
    state = _cast(load_all(conversions["bf16"]), torch.float32)
    original = state[O0].to(torch.bfloat16)
    state[O0] = state[O0] * (1 + 2**-10)  # a quarter of a bf16 step (8 significant bits)
    assert torch.equal(state[O0].to(torch.bfloat16), original)
    moved = _resaved(conversions["bf16"], state, tmp_path / "moved")
    with pytest.raises(InitialLoadValidationError) as info:
        _load(tiny_model, moved, tmp_path / "fp32-run", torch.float32)
    (problem,) = [p for p in info.value.report.problems if p.kind == "value_mismatch"]
    assert (problem.key, problem.severity) == (O0, "error")
    assert "recorded as bfloat16" in problem.detail
    report, model = _load(tiny_model, moved, tmp_path / "bf16-run", torch.bfloat16)
    assert report.ok and torch.equal(model.state_dict()[O0], original)


def _nudge(state: dict[str, torch.Tensor], crossing: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """``state`` with one fp32 value moved by one ulp (up or down): a value within an ulp of a bf16 rounding
    boundary, so that its bf16 rounding changes (``crossing``), or one whose bf16 rounding stays. Values of at
    least the median magnitude only: one bf16 step of such a value is far above the fingerprint's tolerance."""
    for key in sorted(state):
        t = state[key]
        if t.dtype != torch.float32 or t.dim() != 2:
            continue
        for toward in (float("inf"), float("-inf")):
            moved = torch.nextafter(t, torch.full_like(t, toward))
            crosses = moved.to(torch.bfloat16) != t.to(torch.bfloat16)
            found = (crosses if crossing else ~crosses) & (t.abs() >= t.abs().median())
            if found.any():
                where = tuple(int(i) for i in found.nonzero()[0])
                out = t.clone()
                out[where] = moved[where]
                return key, {**state, key: out}
    raise AssertionError("no fp32 value within an ulp of a bf16 rounding boundary")


@pytest.mark.parametrize("survives", [True, False], ids=["crosses a bf16 boundary", "rounded away"])
def test_one_fp32_ulp_in_bf16_parameters_is_named_when_it_reaches_them(survives, conversions, tiny_model, tmp_path):
    """An fp32 conversion loaded into bf16 parameters: the guard verifies what the trainer holds (the bf16
    rounding of each recorded value). One value nudged by one fp32 ulp is named when the nudge changes the bf16
    parameter, and passes when the load rounds it away (the trainer then holds exactly the right values)."""
    key, state = _nudge(load_all(conversions["fp32"]), crossing=survives)
    nudged = _resaved(conversions["fp32"], state, tmp_path / "nudged")
    if not survives:
        report, _ = _load(tiny_model, nudged, tmp_path / "run", torch.bfloat16)
        assert report.ok and _values_note(report).startswith("values: 25 of 25")
        return
    with pytest.raises(InitialLoadValidationError) as info:
        _load(tiny_model, nudged, tmp_path / "run", torch.bfloat16)
    (problem,) = [p for p in info.value.report.problems if p.kind == "value_mismatch"]
    assert problem.key == key and "values of bfloat16, recorded as float32" in problem.detail


def test_a_record_without_the_trainers_dtype_is_not_verified_never_noise(conversions, tiny_model, tmp_path, caplog):
    """A manifest from before the rounded fingerprints (fp32 only) loaded into bf16 parameters: a warning saying
    why, the final line 'values: 0 of 25'; with verification required, an error. Never a value_mismatch."""
    old = tmp_path / "old"
    shutil.copytree(conversions["fp32"], old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    for entry in manifest["fingerprints"]["tensors"].values():
        entry.pop("rounded", None)
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="flame_ext")
    report, _ = _load(tiny_model, old, tmp_path / "run", torch.bfloat16)
    assert report.ok and not [p for p in report.problems if p.kind == "value_mismatch"]
    (warning,) = [p for p in report.warnings if p.kind == "manifest"]
    assert "values of 25 tensors loaded as bfloat16 are not verified: the record has no bfloat16" in warning.detail
    assert "validated (keys, manifest, values: 0 of 25, buffers" in caplog.messages[-1]
    with pytest.raises(InitialLoadValidationError, match="not verified"):
        _load(tiny_model, old, tmp_path / "required", torch.bfloat16, initial_load_verify_values=True)


@pytest.mark.parametrize("params", ["fp32", "bf16"])
def test_a_bf16_checkpoint_verifies_exactly_against_an_fp32_reference_file(
    params, conversions, tiny_model, tmp_path_factory, tmp_path
):
    """`flame-ext reference --dtype float32` records the fp32 values and their bf16 rounding: a bf16 checkpoint
    (converted without a manifest, as another tool would) verifies against the latter, all 25 tensors."""
    from flame_ext.cli import main

    reference = tmp_path_factory.mktemp("reference") / "ref.json"
    assert main(["reference", "--model", str(tiny_model), "--out", str(reference), "--dtype", "float32"]) == 0
    bare = save_dcp(load_all(conversions["bf16"]), tmp_path / "bare")  # no flame_ext.json
    report, _ = _load(tiny_model, bare, tmp_path / "run", DTYPES[params], initial_load_reference=str(reference))
    assert report.ok and not [p for p in report.problems if p.kind in ("value_mismatch", "manifest")]
    assert _values_note(report).startswith("values: 25 of 25 tensors verified")
