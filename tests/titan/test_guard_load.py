"""The guard inside the installed torchtitan's real CheckpointManager (0.1.x in .venv-titan01, 0.3.x in .venv).

The same scenarios run against either generation: the embedded OLMo2 built the way flame builds it
(meta -> to_empty -> post_init), loaded from a checkpoint written by `flame-ext convert`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from _models import ADDED, DROPPED, RESHAPED, hf_like_trainer, leave_rope_uninitialised, rope_is_right
from support.cli import report_json
from support.titan_hosts import build_manager, save_step, titan_generation

from flame_ext.errors import GuardConfigError, InitialLoadValidationError
from flame_ext.io.hf import open_hf, read_tensor

pytestmark = pytest.mark.skipif(
    titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"
)

STEP0_LINE = re.compile(r"step-0 loss (\S+) vs HF reference (\S+) \(delta (\S+), threshold (\S+)\)")


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


def as_step0(checkpoint: Path, base: Path) -> Path:
    """Put a converted checkpoint where flame expects it: <dump>/checkpoint/step-0."""
    shutil.copytree(checkpoint, base / "checkpoint" / "step-0")
    return base


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (uninitialised memory may hold NaN, which ``torch.equal`` never calls equal)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def step0_figures(caplog) -> tuple[float, float, float, float]:
    lines = [r.getMessage() for r in caplog.records if STEP0_LINE.search(r.getMessage())]
    assert lines, "no step-0 comparison was logged"
    return tuple(float(x) for x in STEP0_LINE.search(lines[-1]).groups())  # type: ignore[return-value]


def json_record(caplog) -> dict:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flame-ext initial-load report: ")]
    assert lines, "no JSON record was logged"
    return report_json(lines[-1].split(": ", 1)[1])


def test_healthy_checkpoint_passes_and_logs_the_step0_loss(healthy, tiny_model, tmp_path, caplog):
    model = hf_like_trainer(tiny_model)
    manager = build_manager(model, as_step0(healthy, tmp_path), validate_initial_load=True)
    assert manager.load() is True
    observed, reference, delta, threshold = step0_figures(caplog)
    assert abs(delta) < 0.01 and threshold == 0.1
    assert manager.initial_load_report.ok and not manager.initial_load_report.errors
    record = json_record(caplog)
    assert (
        record["ok"] is True
        and record["verdict"] == "OK"
        and record["checked"] == ["keys", "manifest", "values", "buffers", "loss"]
    )
    assert record["loss"]["reference"] == pytest.approx(reference, abs=1e-4)
    assert len(record["loss"]["by_position"]) == 4
    assert any(r.getMessage().startswith("step-0 loss by position: ") for r in caplog.records)
    # the load happened (weights are the HF ones) and training mode was given back
    hf = open_hf(tiny_model)
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(model.state_dict()[key], read_tensor(hf.tensors[key]))
    assert model.training and all(m.training for m in model.modules())
    manager.close()


def test_uninitialised_rope_aborts_when_repair_is_off(healthy, tiny_model, tmp_path):
    model = hf_like_trainer(tiny_model)
    leave_rope_uninitialised(model)
    manager = build_manager(
        model, tmp_path, initial_load_path=str(healthy), validate_initial_load=True, initial_load_repair_buffers=False
    )
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    kinds = {p.kind for p in info.value.report.errors}
    assert kinds == {"buffer_mismatch", "loss_gap"}
    assert "model.rotary_emb.inv_freq" in {p.key for p in info.value.report.errors}
    assert info.value.report.loss.delta > 0.1
    assert "initial_load_repair_buffers" in str(info.value)
    # RoPE cannot change the first position (it attends only to itself): exact there, and the hint says so.
    assert abs(info.value.report.loss.first_position_delta) < 1e-3
    gap = next(p for p in info.value.report.errors if p.kind == "loss_gap")
    assert "positional encoding" in gap.hint
    # The wrong buffers are the cause, named first; no value check is offered (it reads no buffer).
    assert (
        gap.hint.startswith("caused by the buffer_mismatch above (model.rotary_emb.inv_freq")
        and "--values" not in gap.hint
    )


def test_uninitialised_rope_passes_after_repair(healthy, tiny_model, tmp_path, caplog):
    model = hf_like_trainer(tiny_model)
    leave_rope_uninitialised(model)
    manager = build_manager(model, tmp_path, initial_load_path=str(healthy), validate_initial_load=True)
    assert manager.load() is True
    assert rope_is_right(model)
    assert abs(step0_figures(caplog)[2]) < 0.01
    assert any("repaired non-persistent buffer model.rotary_emb.inv_freq" in r.getMessage() for r in caplog.records)


def test_key_problems_abort_before_any_tensor_is_read(broken_keys, tiny_model, tmp_path):
    """The checkpoint's data files are empty: a read would fail differently. All problems are listed."""
    model = hf_like_trainer(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager = build_manager(model, tmp_path, initial_load_path=str(broken_keys), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    by_kind = {}
    for p in info.value.report.errors:
        by_kind.setdefault(p.kind, set()).add(p.key)
    assert by_kind == {"missing_key": set(DROPPED), "unexpected_key": {ADDED}, "shape_mismatch": {RESHAPED}}
    message = str(info.value)
    assert "nothing was read" in message and all(k in message for k in (*DROPPED, ADDED, RESHAPED))
    assert all(same_bits(before[k], v) for k, v in model.state_dict().items())
    assert info.value.report.loss is None


def test_swapped_layers_are_named_by_the_values_and_the_loss_gate(swapped, tiny_model, tmp_path):
    model = hf_like_trainer(tiny_model)
    manager = build_manager(model, tmp_path, initial_load_path=str(swapped), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    report = info.value.report
    # one cause, one error: both layers named, with the count of tensors that hold each other's values; the
    # loss gate agrees
    (values,) = [p for p in report.errors if p.kind == "value_mismatch"]
    layer_keys = {k for k in hf_like_trainer(tiny_model).state_dict() if ".layers." in k}
    assert values.key is None and values.detail.startswith(
        f"model.layers.0 and model.layers.1 are swapped: {len(layer_keys)} tensors hold each other's values"
    )
    assert [p.kind for p in report.errors if p.kind != "value_mismatch"] == ["loss_gap"]
    assert report.counts["missing"] == report.counts["unexpected"] == report.counts["shape"] == 0
    assert abs(report.loss.delta) > 0.1
    gap = next(p for p in report.errors if p.kind == "loss_gap")
    assert "positional encoding" not in gap.hint  # whole layers: the first position is off too


def test_a_resume_runs_the_resume_check_not_the_initial_one(healthy, tiny_model, tmp_path, caplog):
    first = build_manager(
        hf_like_trainer(tiny_model), tmp_path, initial_load_path=str(healthy), validate_initial_load=True
    )
    assert first.load()
    first.states["train_state"].step = 1
    save_step(first, 1)
    first.close()
    # A resume with what only the initial load needs missing (the reference file) and RoPE garbage.
    model = hf_like_trainer(tiny_model)
    leave_rope_uninitialised(model)
    caplog.clear()
    manager = build_manager(
        model,
        tmp_path,
        initial_load_path=str(healthy),
        validate_initial_load=True,
        initial_load_reference=str(tmp_path / "absent.json"),
    )
    assert manager.load() is True
    assert manager.states["train_state"].step == 1 and rope_is_right(model)
    lines = [r.getMessage() for r in caplog.records]
    assert any("resume from" in line and "validated (buffers, values)" in line for line in lines)
    assert not any(STEP0_LINE.search(r.getMessage()) for r in caplog.records)


def test_missing_reference_is_a_clear_error_before_loading(healthy, tiny_model, tmp_path):
    bare = tmp_path / "no-manifest"
    shutil.copytree(healthy, bare, ignore=shutil.ignore_patterns("flame_ext.json"))
    model = hf_like_trainer(tiny_model)
    before = model.state_dict()["model.norm.weight"].clone()
    manager = build_manager(model, tmp_path / "run", initial_load_path=str(bare), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError, match="flame-ext reference --model HF --out FILE") as info:
        manager.load()
    assert [p.kind for p in info.value.report.problems] == ["manifest"]
    assert same_bits(model.state_dict()["model.norm.weight"], before)


def test_flame_stock_layout_is_named_with_its_fix(nested, tiny_model, tmp_path):
    model = hf_like_trainer(tiny_model)
    manager = build_manager(model, as_step0(nested, tmp_path), validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    layout = [p for p in info.value.report.errors if p.kind == "layout"]
    assert layout and "'model.' prefix" in layout[0].detail and "flame-ext convert" in layout[0].hint


def test_stock_config_leaves_the_guard_off(swapped, tiny_model, tmp_path, caplog):
    """Without the fields (a stock JobConfig / Config) the manager loads like the host's own."""
    manager = build_manager(hf_like_trainer(tiny_model), tmp_path, initial_load_path=str(swapped))
    assert manager.guard_config.validate_initial_load is False
    assert manager.load() is True
    assert not any("flame_ext" in r.name for r in caplog.records)


def test_bad_threshold_is_rejected_at_construction(tiny_model, tmp_path):
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(GuardConfigError, match="initial_load_max_loss_delta"):
            build_manager(
                hf_like_trainer(tiny_model), tmp_path, validate_initial_load=True, initial_load_max_loss_delta=bad
            )


def test_pipeline_parallel_is_refused_clearly(healthy, tiny_model, tmp_path):
    parts = [hf_like_trainer(tiny_model), hf_like_trainer(tiny_model)]  # pipeline parallel: several model parts
    manager = build_manager(
        parts, tmp_path, initial_load_path=str(healthy), validate_initial_load=True, pipeline_degree=2
    )
    with pytest.raises(GuardConfigError, match="does not support pipeline parallel"):
        manager.load()


def test_step0_figures_go_to_the_host_metric_logger(healthy, tiny_model, tmp_path):
    """TensorBoard through torchtitan's own logger: 0.3 takes the Trainer's metrics processor, 0.1 (flame builds
    its metric logger after loading) gets it after the load."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchtitan.components.metrics import TensorBoardLogger

    board = TensorBoardLogger(str(tmp_path / "tb"))
    manager = build_manager(
        hf_like_trainer(tiny_model), tmp_path, initial_load_path=str(healthy), validate_initial_load=True
    )
    if titan_generation() == "0.3":
        manager.states["train_state"].metrics_processor = board
        manager.load()
    else:
        manager.load()
        manager.record_initial_load_metrics(board)
    board.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("initial_load/loss")
    assert [e.step for e in loss] == [0]
    assert loss[0].value == pytest.approx(manager.initial_load_report.loss.observed, rel=1e-6)
    assert "initial_load/reference_loss" in events.Tags()["scalars"]
    (tokens,) = events.Scalars("initial_load/token_delta")  # beside the mean: what its cancelling errors hide
    assert tokens.value == pytest.approx(manager.initial_load_report.loss.token_delta, rel=1e-5, abs=1e-9)


def test_fresh_keys_listed_in_the_manifest_are_expected(tiny_model, tmp_path):
    """A checkpoint converted with a freshly initialised future predictor, loaded by a model without one:
    the head's keys are in the checkpoint only, and the manifest says they are fresh, so no problem."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    ckpt = tmp_path / "with-head"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(tiny_model),
            checkpoint=str(ckpt),
            include_future_predictor=True,
            future_predictor_head_type="linear",
            progress=False,
        )
    )
    fresh = json.loads((ckpt / "flame_ext.json").read_text())["fresh_keys"]
    assert fresh and all(k.startswith("future_predictor.") for k in fresh)
    manager = build_manager(
        hf_like_trainer(tiny_model), tmp_path / "run", initial_load_path=str(ckpt), validate_initial_load=True
    )
    assert manager.load() is True
    assert manager.initial_load_report.problems == [] and manager.initial_load_report.counts["unexpected"] == 0


def test_the_adapter_imports_without_triton():
    """torchtitan 0.3's trainer needs triton; the guard's adapter must not (a blocked import proves it)."""
    import subprocess
    import sys

    extra = "import flame_ext.titan.config03; " if titan_generation() == "0.3" else ""
    code = (
        "import sys; sys.modules['triton'] = None; "
        f"from flame_ext.titan import ValidatingCheckpointManager; {extra}print(ValidatingCheckpointManager.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"flame_ext.titan.v0{titan_generation()[-1]}"


def test_a_config_the_installed_transformers_misreads_is_stopped_before_the_load(tiny_model, tmp_path):
    """The source's config.json states rope_theta 500000 only in rope_parameters (transformers 5's spelling):
    4.x builds the trainer's model with its default 10000 and the guard says so before a tensor is read; 5.x
    reads it as written and the load passes. The source folder moved away: a note, nothing checked."""
    import sys

    from support.cli import transformers_major

    from flame_ext.cli import main

    sys.path.insert(0, str(Path(__file__).parents[1] / "checks" / "config"))
    from test_misread import rope_parameters_config

    source = tmp_path / "olmo2"
    shutil.copytree(tiny_model, source)
    (source / "config.json").write_text(json.dumps(rope_parameters_config()))
    dcp = tmp_path / "step-0"
    assert main(["convert", "--model", str(source), "--checkpoint", str(dcp), "--no-reference"]) == 0

    def load(run: str):
        manager = build_manager(
            hf_like_trainer(source), tmp_path / run, initial_load_path=str(dcp), validate_initial_load=True
        )
        try:
            manager.load()
        except InitialLoadValidationError as exc:
            return exc.report
        return manager.initial_load_report

    report = load("run")
    found = [p for p in report.problems if p.kind == "config_mismatch"]
    if transformers_major() < 5:
        assert [(p.severity, p.key) for p in found] == [("error", "rope_theta")]
        assert "trainer's model" in found[0].detail and "10000.0" in found[0].detail
        assert report.loss is None  # stopped before the load
    else:
        assert found == []
    shutil.move(source, tmp_path / "moved")
    source = tmp_path / "moved"
    report = load("run-moved")
    assert not [p for p in report.problems if p.kind == "config_mismatch"]
    assert any("was not checked against the installed transformers" in n for n in report.notes)
