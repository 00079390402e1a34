"""A torchtitan 0.3 config function with the guard, the way a user's config_registry adds it.

``--module guarded_configs --config llama3_debugmodel_guarded`` (with this folder on sys.path); the guard
fields are then ordinary flags: ``--checkpoint.validate_initial_load --checkpoint.initial_load_max_loss_delta 0.05``.
"""

from torchtitan.models.llama3.config_registry import llama3_debugmodel

from flame_ext.titan.config03 import with_initial_load_guard


def llama3_debugmodel_guarded():
    return with_initial_load_guard(llama3_debugmodel())
