"""torchtitan 0.1.x only (flame's generation): full training-state loads and the TOML / custom-args config."""

from __future__ import annotations

import pytest
from _models import hf_like_trainer
from support.titan_hosts import build_manager, titan_generation

from flame_ext.errors import InitialLoadValidationError

pytestmark = pytest.mark.skipif(
    titan_generation() != "0.1",
    reason="torchtitan 0.1.x API (job_config, "
    "initial_load_model_weights_only, TOML); this environment has another generation",
)


def test_full_load_of_a_weights_only_checkpoint_lists_layout_and_missing_states(healthy, tiny_model, tmp_path):
    """initial_load_model_weights_only = false asks for {"model": ..., "optimizer": ..., ...} nested."""
    model = hf_like_trainer(tiny_model)
    manager = build_manager(model, tmp_path, initial_load_path=str(healthy), full_load=True, validate_initial_load=True)
    with pytest.raises(InitialLoadValidationError, match="nothing was read") as info:
        manager.load()
    errors = info.value.report.errors
    layout = [p for p in errors if p.kind == "layout"]
    assert layout and "initial_load_model_weights_only = true" in layout[0].hint
    missing_states = {p.key for p in errors if p.kind == "missing_key" and p.key.endswith(".*")}
    assert {"optimizer.*", "lr_scheduler.*", "train_state.*"} <= missing_states


def test_toml_job_config_switches_the_guard_on(tmp_path):
    from torchtitan.config_manager import ConfigManager

    from flame_ext.titan import ValidatingCheckpointManager

    toml = tmp_path / "job.toml"
    toml.write_text(
        '[experimental]\ncustom_args_module = "flame_ext.titan.v01"\n\n'
        "[checkpoint]\nenable_checkpoint = true\nvalidate_initial_load = true\ninitial_load_max_loss_delta = 0.05\n"
    )
    job = ConfigManager().parse_args(
        ["--job.config_file", str(toml), "--checkpoint.initial_load_reference", "/x/ref.json"]
    )
    assert (job.checkpoint.validate_initial_load, job.checkpoint.initial_load_max_loss_delta) == (True, 0.05)
    assert job.checkpoint.initial_load_repair_buffers is True
    from torch import nn
    from torchtitan.components.ft import FTManager
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers

    model = nn.Linear(2, 2)
    job.job.dump_folder = str(tmp_path)
    job.checkpoint.keep_latest_k = 0
    opt = build_optimizers([model], job, FTManager(None))
    manager = ValidatingCheckpointManager(
        dataloader=None,
        model_parts=[model],
        optimizers=opt,
        lr_schedulers=build_lr_schedulers(opt, job),
        states={},
        job_config=job,
        ft_manager=FTManager(None),
    )
    assert manager.guard_config.validate_initial_load and manager.guard_config.initial_load_reference == "/x/ref.json"
