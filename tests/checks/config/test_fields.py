"""The three field lists: disjoint, and every field of the base config is in one of them."""

from __future__ import annotations

from flame_ext.checks.config import COMPUTE_FIELDS, IGNORED_FIELDS, TRAINING_FIELDS, classify


def test_field_lists_are_disjoint():
    assert (
        not (COMPUTE_FIELDS & TRAINING_FIELDS)
        and not (COMPUTE_FIELDS & IGNORED_FIELDS)
        and not (TRAINING_FIELDS & IGNORED_FIELDS)
    )


def test_every_field_of_the_base_config_is_classified():
    """A transformers upgrade that adds a base-config field makes this fail: classify it explicitly."""
    from transformers import PretrainedConfig

    assert [k for k in PretrainedConfig().to_dict() if classify(k) == "unlisted"] == []


def test_a_scaled_rope_makes_every_rope_parameter_and_the_length_limit_compute_fields():
    assert classify("rope_scaling.factor") == "compute"
    assert classify("max_position_embeddings", {"rope_type": "default"}) == "training"
    assert classify("max_position_embeddings", {"rope_type": "yarn"}) == "compute"
    assert classify("a_field_nobody_knows") == "unlisted"
