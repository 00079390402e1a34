"""The guard inside the installed torchtitan's real CheckpointManager, loading fla families built as flame builds
them (meta -> to_empty -> post_init). On the CPU their forward pass cannot run: the loss gate is skipped with a
warning, and the key check before loading and the buffer check and repair after it run all the same.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from fla_models import FAMILIES, ROTARY, fla_config, like_flame
from support.titan_hosts import build_manager, titan_generation
from test_fla_commands import hf_weights

from flame_ext.checks.nonpersistent_buffers import nonpersistent_buffer_modules
from flame_ext.errors import InitialLoadValidationError
from flame_ext.io.hf import nonpersistent_buffers

pytestmark = pytest.mark.skipif(
    titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"
)


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


def poison_buffers(model: torch.nn.Module) -> list[str]:
    """What to_empty() may leave in non-persistent buffers (post_init may have recomputed them): NaN."""
    for _, module, names in nonpersistent_buffer_modules(model):
        for b in names:
            module._buffers[b].fill_(float("nan"))
    return nonpersistent_buffers(model)


def freshly_built_buffers(name: str) -> dict[str, torch.Tensor]:
    """The buffers of the model built for real on the CPU (what every rank should hold)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(fla_config(name))
    wanted = set(nonpersistent_buffers(model))
    return {k: v for k, v in model.named_buffers() if k in wanted}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_guard_repairs_every_buffer_and_skips_only_the_loss_gate(name, fla_hf, fla_dcp, tmp_path, caplog):
    dcp_dir, _ = fla_dcp(name)
    model = like_flame(fla_hf(name))
    poisoned = poison_buffers(model)
    assert bool(poisoned) == (name in ROTARY)
    manager = build_manager(model, tmp_path, initial_load_path=str(dcp_dir), validate_initial_load=True)
    assert manager.load() is True
    report = manager.initial_load_report
    assert report.ok and report.loss is None
    assert any(n.startswith("step-0 loss not measured:") and "Triton" in n for n in report.notes)
    messages = [r.getMessage() for r in caplog.records]
    assert any(r.levelno == logging.WARNING and "loss gate skipped" in r.getMessage() for r in caplog.records)
    assert sorted(
        m.split("repaired non-persistent buffer ")[1].split(" ")[0] for m in messages if "flame-ext: repaired" in m
    ) == sorted(poisoned)
    expected = freshly_built_buffers(name)
    assert sorted(expected) == sorted(poisoned)
    actual = dict(model.named_buffers())
    assert all(torch.equal(actual[k], v) for k, v in expected.items())
    weights = hf_weights(fla_hf(name))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # the load happened
    manager.close()


@pytest.mark.parametrize("name", ROTARY)
def test_guard_stops_on_every_wrong_buffer_when_repair_is_off(name, fla_hf, fla_dcp, tmp_path):
    dcp_dir, _ = fla_dcp(name)
    model = like_flame(fla_hf(name))
    poisoned = poison_buffers(model)
    manager = build_manager(
        model, tmp_path, initial_load_path=str(dcp_dir), validate_initial_load=True, initial_load_repair_buffers=False
    )
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    errors = info.value.report.errors
    assert {p.kind for p in errors} == {"buffer_mismatch"}
    assert sorted(p.key for p in errors) == sorted(poisoned)


def test_guard_key_check_still_runs_before_loading(fla_hf, fla_dcp, tmp_path):
    """A key missing from an fla checkpoint stops the run before a tensor is read, as for any model."""
    from _models import rewrite_dcp

    dcp_dir, _ = fla_dcp("gla")
    dropped = "model.layers.1.attn.q_proj.weight"
    broken = rewrite_dcp(dcp_dir, tmp_path / "broken", lambda sd: {k: v for k, v in sd.items() if k != dropped})
    model = like_flame(fla_hf("gla"))
    manager = build_manager(model, tmp_path / "run", initial_load_path=str(broken), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError, match="nothing was read") as info:
        manager.load()
    assert [(p.kind, p.key) for p in info.value.report.errors] == [("missing_key", dropped)]


def test_no_reference_is_an_error_where_the_model_can_run(tiny_model, tiny_dcp, tmp_path):
    """A manifest without a reference (convert could not run the model) only skips the gate where the forward
    cannot run either; the embedded OLMo2 runs on the CPU, so here it stops the run, saying what to do."""
    import json

    from test_guard_load import hf_like_trainer

    from flame_ext.io.manifest import MANIFEST_NAME

    step0 = tmp_path / "ckpt"
    shutil.copytree(tiny_dcp, step0)
    manifest = json.loads((step0 / MANIFEST_NAME).read_text())
    manifest.update(reference=None, reference_unavailable="Olmo2ForCausalLM could not run where it was converted")
    (step0 / MANIFEST_NAME).write_text(json.dumps(manifest))
    manager = build_manager(
        hf_like_trainer(tiny_model), tmp_path / "run", initial_load_path=str(step0), validate_initial_load=True
    )
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    (problem,) = info.value.report.errors
    assert problem.kind == "manifest" and "this machine can" in problem.detail
    assert "flame-ext reference" in problem.hint
