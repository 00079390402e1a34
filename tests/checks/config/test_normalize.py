"""One comparable form of a config: every transformers spelling of the rope settings reads alike."""

from __future__ import annotations

import math

import pytest

from flame_ext.checks.config.normalize import flattened, same_value


@pytest.mark.parametrize(
    "spelling",
    [
        {"rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0}},  # before transformers 4.45
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},  # 4.45 .. 4.x
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}},  # transformers 5
    ],
)
def test_every_rope_spelling_flattens_to_one(spelling):
    assert flattened(spelling) == {"rope_theta": 5e5, "rope_type": "yarn", "rope_scaling.factor": 4.0}


def test_a_config_without_rope_settings_has_the_default_rope():
    assert flattened({"hidden_size": 8}) == {"hidden_size": 8, "rope_type": "default"}


def test_same_value_reads_transformers_float_spelling_and_tuples():
    assert same_value({"__float__": "Infinity"}, math.inf)
    assert same_value((1, 2), [1, 2])
    assert same_value(0.1 + 0.2, 0.3)
    assert not same_value(1e-5, 1e-6)
    assert not same_value("gelu", "silu")
