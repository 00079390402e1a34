"""Every load of a run verified, on the installed torchtitan's real CheckpointManager (0.1.x or 0.3.x), one rank.

A run starts from the converted embedded OLMo2 (guarded), trains one real AdamW step and saves step 1; the
resume rebuilds the model the way flame does (meta -> to_empty -> post_init) and loads that step folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from _models import hf_like_trainer, leave_rope_uninitialised, rope_is_right
from _steps import key_ending, read_step, rewrite_step, train_step
from support.titan_hosts import build_manager, save_step, titan_generation

from flame_ext.checks.nonpersistent_buffers import fresh_buffers, nonpersistent_buffer_modules
from flame_ext.errors import InitialLoadValidationError
from flame_ext.guard import ResumeValidationError
from flame_ext.io.training_state import flatten_state

pytestmark = pytest.mark.skipif(
    titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"
)


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def saved(healthy, tiny_model, tmp_path_factory) -> Path:
    """A run's dump folder: the first load (guarded), one training step, a full checkpoint at step 1."""
    base = tmp_path_factory.mktemp("run")
    model = hf_like_trainer(tiny_model)
    manager = build_manager(model, base, initial_load_path=str(healthy), validate_initial_load=True)
    assert manager.load()
    train_step(model, manager)
    save_step(manager, 1)
    manager.close()
    return base


def step1(base: Path) -> Path:
    return base / "checkpoint" / "step-1"


def copy_run(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def resumed(base: Path, tiny_model: Path, **guard):
    """A fresh model built as flame builds it, its RoPE as to_empty leaves it, and a manager over ``base``."""
    model = hf_like_trainer(tiny_model)
    left_garbage = leave_rope_uninitialised(model)
    return model, build_manager(model, base, **{"validate_initial_load": True, **guard}), left_garbage


def live_state(manager) -> dict:
    """What the manager would save now, as DCP keys."""
    states = manager._flattened_model_states_sd() if titan_generation() == "0.3" else manager.states
    return flatten_state(states)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_the_record_holds_every_saved_key_with_its_kind(saved):
    record = json.loads((step1(saved) / "flame_ext.json").read_text())
    assert (record["format_version"], record["kind"], record["step"], record["world_size"]) == (
        1,
        "training_step",
        1,
        1,
    )
    tensors, digests = record["fingerprints"]["tensors"], record["digests"]
    saved_keys = read_step(step1(saved))
    assert set(tensors) | set(digests) == set(saved_keys) and not set(tensors) & set(digests)
    assert {k for k, v in saved_keys.items() if isinstance(v, torch.Tensor)} == set(tensors)
    groups = {k: v["group"] for k, v in tensors.items()}
    assert groups[key_ending(tensors, "layers.0.self_attn.q_proj.weight", "model")] == "model"
    assert groups[key_ending(tensors, "layers.0.self_attn.q_proj.weight.exp_avg")] == "optimizer"
    assert groups[key_ending(tensors, "layers.0.self_attn.q_proj.weight.step")] == "optimizer"
    assert groups["train_state.step"] == "state" and digests["lr_scheduler.last_epoch"]["group"] == "state"
    assert all(len(d["sha256"]) == 64 for d in digests.values())
    assert len(tensors) == 101  # 25 parameters, 3 AdamW tensors each, the train step


def test_a_healthy_resume_repairs_rope_and_loads_what_was_saved(saved, tiny_model, tmp_path, caplog):
    base = copy_run(saved, tmp_path)
    model, manager, _ = resumed(base, tiny_model)
    assert not rope_is_right(model)  # as to_empty left it (4.57 by itself, mostly; 5.x overwritten by the test)
    assert manager.load() is True
    assert rope_is_right(model)
    assert f"repaired non-persistent buffer model.rotary_emb.inv_freq after loading {step1(base)}" in "\n".join(
        messages(caplog)
    )
    on_disk, live = read_step(step1(base)), live_state(manager)
    for key, value in on_disk.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(live[key], value), key
        else:
            assert live[key] == value, key
    assert manager.states["train_state"].step == 1
    assert any("values: 101 of 101 tensors verified" in m for m in messages(caplog))
    assert manager.resume_report.ok and manager.resume_report.checked == ["buffers", "values"]
    train_step(model, manager, seed=1)  # and it trains on
    manager.close()


def _swap_rows(sd: dict, key: str) -> None:
    sd[key] = sd[key][[1, 0, *range(2, sd[key].shape[0])]]


def _halve(sd: dict, key: str) -> None:
    sd[key] = sd[key] * 0.5


def _zero_row(sd: dict, key: str) -> None:
    sd[key][0] = 0


def _advance(sd: dict, key: str) -> None:
    sd[key] += 1


DAMAGES = {
    "weight_rows_swapped": ("layers.0.self_attn.q_proj.weight", "model", _swap_rows, "model", "rows permuted"),
    "exp_avg_halved": ("layers.1.mlp.up_proj.weight.exp_avg", "", _halve, "optimizer state", "scaled by 0.5"),
    "exp_avg_sq_row_zeroed": ("layers.0.mlp.down_proj.weight.exp_avg_sq", "", _zero_row, "optimizer state", ""),
    "scheduler_epoch_moved": ("lr_scheduler.last_epoch", "", _advance, "other state", "sha256"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_one_value_changed_after_the_save_stops_the_resume_naming_it(saved, tiny_model, tmp_path, damage):
    suffix, prefix, edit, kind, finding = DAMAGES[damage]
    base = tmp_path / "run"
    shutil.copytree(saved, base, ignore=shutil.ignore_patterns("step-1"))
    key = key_ending(read_step(step1(saved)), suffix, prefix)
    rewrite_step(step1(saved), step1(base), lambda sd: edit(sd, key))
    _, manager, _ = resumed(base, tiny_model)
    with pytest.raises(ResumeValidationError) as info:
        manager.load()
    assert isinstance(info.value, InitialLoadValidationError)  # existing catches keep working
    (problem,) = info.value.report.errors
    assert (problem.kind, problem.key) == ("value_mismatch", key)
    assert f"at the save of step 1 ({kind})" in problem.detail and finding in problem.detail, problem.detail
    assert "do not train on" in problem.hint
    assert key in str(info.value) and f"resume from {step1(base)} failed validation" in str(info.value)


def test_without_the_guard_the_same_damage_goes_through_silently(saved, tiny_model, tmp_path, caplog):
    """The control: torchtitan's own load takes the halved exp_avg and says nothing."""
    suffix = DAMAGES["exp_avg_halved"][0]
    base = tmp_path / "run"
    shutil.copytree(saved, base, ignore=shutil.ignore_patterns("step-1"))
    key = key_ending(read_step(step1(saved)), suffix)
    rewrite_step(step1(saved), step1(base), lambda sd: _halve(sd, key))
    model = hf_like_trainer(tiny_model)
    manager = build_manager(model, base)  # stock settings: the guard off
    assert manager.load() is True
    assert torch.equal(live_state(manager)[key], read_step(step1(saved))[key] * 0.5)
    assert not any(r.name.startswith("flame_ext") for r in caplog.records)


def test_a_step_folder_without_a_record_warns_and_trains(saved, tiny_model, tmp_path, caplog):
    base = copy_run(saved, tmp_path)
    (step1(base) / "flame_ext.json").unlink()
    model, manager, _ = resumed(base, tiny_model)
    assert manager.load() is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not be verified (no save-time record:" in w and "is absent" in w for w in warnings), warnings
    assert rope_is_right(model)  # the buffers are checked all the same
    train_step(model, manager, seed=1)


def test_settings_switch_the_resume_checks_off(saved, tiny_model, tmp_path, caplog):
    base = tmp_path / "run"
    shutil.copytree(saved, base, ignore=shutil.ignore_patterns("step-1"))
    key = key_ending(read_step(step1(saved)), DAMAGES["exp_avg_halved"][0])
    rewrite_step(step1(saved), step1(base), lambda sd: _halve(sd, key))
    model, manager, _ = resumed(base, tiny_model, verify_resumes=False, check_buffers_on_every_load=False)
    assert manager.load() is True
    assert not rope_is_right(model)  # nothing looked at it
    assert not any("repaired non-persistent buffer" in m for m in messages(caplog))


def test_a_wrong_buffer_on_resume_stops_it_when_repair_is_off(saved, tiny_model, tmp_path):
    base = copy_run(saved, tmp_path)
    model, manager, _ = resumed(base, tiny_model, initial_load_repair_buffers=False)
    with pytest.raises(ResumeValidationError) as info:
        manager.load()
    assert {p.kind for p in info.value.report.errors} == {"buffer_mismatch"}
    assert "model.rotary_emb.inv_freq" in {p.key for p in info.value.report.errors}


def test_the_guarded_save_writes_the_bytes_a_stock_save_writes(saved, tiny_model, tmp_path):
    """The same state saved by torchtitan's stock manager: every data file is byte-identical."""
    from flame_ext.titan import ValidatingCheckpointManager
    from flame_ext.titan.managers import build_checkpoint_manager

    stock_class = ValidatingCheckpointManager.__mro__[1]  # torchtitan's own CheckpointManager
    base = tmp_path / "stock"
    shutil.copytree(saved, base)
    model = hf_like_trainer(tiny_model)
    stock = build_checkpoint_manager([model], base, manager_class=stock_class).manager
    assert type(stock) is stock_class and stock.load() is True
    save_step(stock, 2)
    stock.close()
    ours, theirs = sorted(step1(saved).glob("*.distcp")), sorted((base / "checkpoint" / "step-2").glob("*.distcp"))
    assert [p.name for p in ours] == [p.name for p in theirs]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))
    assert not (base / "checkpoint" / "step-2" / "flame_ext.json").exists()


def test_the_resume_figures_go_to_the_metric_logger(saved, tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchtitan.components.metrics import TensorBoardLogger

    base = copy_run(saved, tmp_path)
    board = TensorBoardLogger(str(tmp_path / "tb"))
    _, manager, _ = resumed(base, tiny_model)
    if titan_generation() == "0.3":
        manager.states["train_state"].metrics_processor = board
        manager.load()
    else:
        manager.load()  # flame builds its metric logger after loading
        manager.record_initial_load_metrics(board)
    board.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    verified = events.Scalars("resume/tensors_verified")
    assert [(e.step, e.value) for e in verified] == [(1, 101.0)]
    assert [e.value for e in events.Scalars("resume/value_mismatches")] == [0.0]
    assert "resume/seconds" in events.Tags()["scalars"]


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank gloo process group: torchtitan's async saves and purges need one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_async_save_is_recorded_once_it_has_completed(one_rank_group, tiny_model, tmp_path):
    """torchtitan's "async" mode (a thread writes while training goes on): the record appears only after the
    save's .metadata (the last file DCP writes), and the resume passes."""
    base = tmp_path / "run"
    model = hf_like_trainer(tiny_model)
    manager = build_checkpoint(model, base, async_mode="async", interval=1)
    train_step(model, manager)
    assert manager.save(curr_step=1) in (True, None)  # 0.3 returns True, 0.1 None; 1 is a save step in both
    record, metadata = step1(base) / "flame_ext.json", step1(base) / ".metadata"
    assert not record.exists() or metadata.exists()
    save_step(manager, 2)  # the host waits for the async save before the next one
    manager.close()
    assert record.is_file()
    assert all(record.stat().st_mtime_ns >= f.stat().st_mtime_ns for f in step1(base).iterdir() if f != record)
    _, again, _ = resumed(base, tiny_model)
    assert again.load(step=1) is True and again.resume_report.ok
    again.close()


def test_an_optimizer_step_right_after_an_async_save_leaves_the_record_of_the_saved_values(
    one_rank_group, tiny_model, tmp_path
):
    """The record's sums run in a background thread after an async save; the next optimizer step waits for
    them, so the record is the one a synchronous save of the same state writes, and the resume passes."""
    records = {}
    for mode in ("disabled", "async"):
        base = tmp_path / mode
        model = hf_like_trainer(tiny_model)
        torch.manual_seed(0)
        with torch.no_grad():  # the same weights and RoPE in both runs (to_empty leaves memory as it finds it)
            for p in model.parameters():
                p.normal_(0, 0.02)
            for _, module, names in nonpersistent_buffer_modules(model):
                fresh = fresh_buffers(module)
                for name in names:
                    module._buffers[name].copy_(fresh[name])
        manager = build_checkpoint(model, base, async_mode=mode, interval=1)
        train_step(model, manager)
        manager.save(curr_step=1)
        train_step(model, manager, seed=1)  # at once: the optimizer changes the saved tensors in place
        getattr(manager, "maybe_wait_for_saving", getattr(manager, "_async_wait", None))()  # 0.3, 0.1
        manager.close()
        records[mode] = json.loads((step1(base) / "flame_ext.json").read_text())
    assert records["async"]["fingerprints"] == records["disabled"]["fingerprints"]  # bit for bit
    assert records["async"]["digests"] == records["disabled"]["digests"]
    _, again, _ = resumed(tmp_path / "async", tiny_model)
    assert again.load(step=1) is True and again.resume_report.ok
    again.close()


def test_the_record_is_purged_with_its_step_folder(one_rank_group, tiny_model, tmp_path):
    base = tmp_path / "run"
    model = hf_like_trainer(tiny_model)
    manager = build_checkpoint(model, base, keep_latest_k=2, interval=1)
    for step in (1, 2, 3):
        train_step(model, manager, seed=step)
        manager.save(curr_step=step)  # interval saves purge (0.3's last-step save does not)
    manager.close()  # joins the host's purge thread
    folders = sorted(p.name for p in (base / "checkpoint").iterdir())
    assert folders == ["step-2", "step-3"]
    assert all((base / "checkpoint" / f / "flame_ext.json").is_file() for f in folders)


def build_checkpoint(model, base: Path, **host):
    """A guarded manager with the host's own checkpoint settings (``async_mode``, ``keep_latest_k``...)."""
    from flame_ext.titan.managers import build_checkpoint_manager

    return build_checkpoint_manager([model], base, guard={"validate_initial_load": True}, host=host).manager


def test_diagnose_verifies_a_saved_step_offline(saved, tmp_path, capsys):
    """``flame-ext diagnose --checkpoint .../step-1 --values``: no trainer, no HF model; the damage named."""
    from flame_ext.cli import main

    assert main(["diagnose", "--checkpoint", str(step1(saved)), "--values"]) == 0
    assert "values: 101 of 101 tensors verified against the save-time record of step 1" in capsys.readouterr().out
    base = tmp_path / "run"
    key = key_ending(read_step(step1(saved)), DAMAGES["exp_avg_halved"][0])
    rewrite_step(step1(saved), step1(base), lambda sd: _halve(sd, key))
    assert main(["diagnose", "--checkpoint", str(step1(base)), "--values"]) == 1
    out = capsys.readouterr().out
    assert f"value_mismatch {key}: its values are not the ones written at the save of step 1 (optimizer state)" in out


def test_to_hf_of_a_saved_step_checks_every_exported_tensor(saved, tiny_model, tmp_path):
    """``flame-ext to-hf`` of a step folder: each exported tensor against the record (at a cast too); a weight
    changed after the save ends the export with nothing published."""
    from support.cli import run_cli

    for dtype in ("auto", "bfloat16"):
        out = tmp_path / f"hf-{dtype}"
        proc = run_cli(
            "to-hf", "--checkpoint", str(step1(saved)), "--config", str(tiny_model), "--out", str(out), "--dtype", dtype
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "values: 25 of 25 exported tensors match the save-time record" in proc.stdout + proc.stderr
    base = tmp_path / "run"
    suffix, prefix = DAMAGES["weight_rows_swapped"][:2]
    key = key_ending(read_step(step1(saved)), suffix, prefix)
    rewrite_step(step1(saved), step1(base), lambda sd: _swap_rows(sd, key))
    out = tmp_path / "hf-damaged"
    proc = run_cli("to-hf", "--checkpoint", str(step1(base)), "--config", str(tiny_model), "--out", str(out))
    assert proc.returncode == 2 and not out.exists(), proc.stderr[-2000:]
    assert f"differ from the save-time record of step 1 (first: {key}:" in proc.stderr
    assert "(model)" in proc.stderr and "nothing written" in proc.stderr
