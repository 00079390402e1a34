"""The package's builder of the installed torchtitan's checkpoint manager (used by the demo and the tests)."""

from __future__ import annotations

import pytest
import torch
from support.titan_hosts import titan_generation

from flame_ext.errors import GuardConfigError
from flame_ext.titan.managers import build_checkpoint_manager

pytestmark = pytest.mark.skipif(titan_generation() is None, reason="needs torchtitan 0.1.x or 0.3.x")


def test_a_guard_setting_that_is_not_declared_is_refused_by_name(tmp_path):
    with pytest.raises(GuardConfigError, match="validate_initial_loads"):
        build_checkpoint_manager([torch.nn.Linear(2, 2)], tmp_path, guard={"validate_initial_loads": True})


def test_the_guard_settings_given_are_the_ones_the_manager_runs_with(tmp_path):
    from flame_ext.titan import ValidatingCheckpointManager

    guard = {"validate_initial_load": True, "initial_load_max_loss_delta": 0.25}
    training = build_checkpoint_manager([torch.nn.Linear(2, 2)], tmp_path, guard=guard, lr=0.5)
    assert isinstance(training.manager, ValidatingCheckpointManager)
    assert training.manager.guard_config.initial_load_max_loss_delta == 0.25
    assert [g["lr"] for g in training.optimizers.optimizers[0].param_groups] == [0.5]
