"""flame's training start, step by step, with the real torchtitan 0.1.0 (flame's generation).

meta build (``AutoModelForCausalLM.from_config``) -> parallelize (FSDP2 ``fully_shard`` on a one-rank gloo
mesh) -> ``to_empty`` -> ``post_init`` -> the validating ``CheckpointManager`` (constructed exactly as
flame's train.py does) -> ``load()`` of ``step-0`` -> one optimizer step. With transformers 4.x this is
where RoPE's ``inv_freq`` stays uninitialised; the control run with torchtitan's stock manager shows
the load "succeeds" and the loss is off, so the guard is what makes the difference.
"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from support.cli import transformers_major

pytestmark = pytest.mark.skipif(
    not version("torchtitan").startswith("0.1"),
    reason=f"flame's generation, torchtitan 0.1.x (installed: {version('torchtitan')}); runs in .venv-titan01",
)


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """A one-rank gloo process group (FSDP2 needs a mesh); a file store, so no port is taken."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def dump(tiny_dcp, tmp_path) -> Path:
    """A flame dump folder whose checkpoint/step-0 is the converted embedded model."""
    shutil.copytree(tiny_dcp, tmp_path / "exp" / "checkpoint" / "step-0")
    return tmp_path / "exp"


def _flame_start(hf: Path, dump: Path, stock: bool = False, **guard):
    """flame/train.py's sequence up to and including ``checkpoint.load``; returns (model, manager, optimizers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from transformers import AutoConfig, AutoModelForCausalLM

    from flame_ext.titan.managers import build_checkpoint_manager

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
        model.apply(lambda m: setattr(m, "_is_hf_initialized", False))
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.post_init()
    model.train()
    training = build_checkpoint_manager([model], dump, guard=guard, manager_class=CheckpointManager if stock else None)
    training.manager.load(step=-1)  # flame's default --checkpoint.load_step
    return model, training.manager, training.optimizers


def _reference(dump: Path) -> dict:
    from flame_ext.io.manifest import read_reference

    return read_reference(dump / "checkpoint" / "step-0")


def _loss_on_reference(model, ref: dict) -> float:
    from flame_ext.model.reference_loss import per_token_loss

    ids = torch.tensor(ref["token_ids"])
    with torch.no_grad():
        return per_token_loss(model(ids).logits, ids).mean().item()


def _inv_freq_is_right(model) -> bool:
    from flame_ext.checks.nonpersistent_buffers import check_buffers

    problems, _ = check_buffers(model, repair=False)
    return not problems


def test_guard_passes_with_repair_and_training_steps(gloo, tiny_model, dump):
    model, manager, optimizers = _flame_start(tiny_model, dump, validate_initial_load=True)
    report = manager.initial_load_report
    assert report is not None and report.ok and report.loss is not None
    ref = _reference(dump)
    assert abs(report.loss.observed - ref["loss_mean"]) <= 1e-3  # fp32 on CPU: the HF loss, up to summation order
    assert _inv_freq_is_right(model)
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ids = torch.tensor(ref["token_ids"])
    loss = model(input_ids=ids, labels=ids.clone()).loss
    loss.backward()
    optimizers.step()
    after = model.state_dict()
    assert torch.isfinite(loss) and abs(loss.item() - ref["loss_mean"]) < 0.05
    assert any(not torch.equal(before[k], after[k].full_tensor()) for k in before)


def test_guard_stops_the_run_without_repair(gloo, tiny_model, dump):
    from flame_ext.errors import InitialLoadValidationError

    if transformers_major() >= 5:
        pytest.skip("transformers >= 5 recomputes inv_freq in post_init(); the 4.x failure needs transformers 4.x")
    with pytest.raises(InitialLoadValidationError) as info:
        _flame_start(tiny_model, dump, validate_initial_load=True, initial_load_repair_buffers=False)
    kinds = {p.kind for p in info.value.report.errors}
    assert "buffer_mismatch" in kinds
    assert any("inv_freq" in (p.key or "") for p in info.value.report.errors)


def test_control_stock_manager_loads_silently_and_the_loss_is_off(gloo, tiny_model, dump):
    """Without the guard: every key loads, nothing complains, and the model is not the HF model."""
    if transformers_major() >= 5:
        pytest.skip("transformers >= 5 recomputes inv_freq in post_init(); the 4.x failure needs transformers 4.x")
    model, _, _ = _flame_start(tiny_model, dump, stock=True)
    assert not _inv_freq_is_right(model)
    ref = _reference(dump)
    assert not abs(_loss_on_reference(model, ref) - ref["loss_mean"]) <= 0.1  # off, or nan


def test_guard_off_is_torchtitans_manager(gloo, tiny_model, dump):
    """A JobConfig without the guard settings: the validating class behaves as the stock one (no report, no
    check)."""
    model, manager, _ = _flame_start(tiny_model, dump)
    assert manager.initial_load_report is None


def test_a_resume_is_verified_and_its_rope_repaired(gloo, tiny_model, dump, caplog):
    """Train one step, save step-1 as flame does, restart (a fresh meta build) and resume: the save is verified,
    inv_freq is repaired again (4.x leaves it uninitialised on every build), and the model computes what an HF
    model with the same weights computes."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM

    model, manager, optimizers = _flame_start(tiny_model, dump, validate_initial_load=True)
    ref = _reference(dump)
    ids = torch.tensor(ref["token_ids"])
    model(input_ids=ids, labels=ids.clone()).loss.backward()
    optimizers.step()
    manager.states["train_state"].step = 1
    manager.save(curr_step=1, force=False)  # flame saves step 1 always
    manager.close()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed, again, _ = _flame_start(tiny_model, dump, validate_initial_load=True)
    assert again.resume_report is not None and again.resume_report.ok
    assert again.states["train_state"].step == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any("values: 101 of 101 tensors verified" in line for line in lines), lines
    if transformers_major() < 5:
        assert any("repaired non-persistent buffer model.rotary_emb.inv_freq after loading" in line for line in lines)
    assert _inv_freq_is_right(resumed)
    weights = {k: v.full_tensor() for k, v in resumed.state_dict().items()}
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model))  # RoPE computed as HF does
    hf.load_state_dict(weights)
    assert _loss_on_reference(resumed, ref) == pytest.approx(_loss_on_reference(hf, ref), abs=1e-5)
