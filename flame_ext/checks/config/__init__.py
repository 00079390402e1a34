"""The model config a trainer builds from, checked: against the HF config the weights were trained with
(``compare``; a torchtitan model's own config: ``native``), and as the installed transformers reads it
(``misread``). ``fields`` sorts config fields into the three lists that decide what is compared,
``normalize`` gives both sides one comparable form.
"""

from flame_ext.checks.config.compare import compare_configs, read_config_file
from flame_ext.checks.config.fields import COMPUTE_FIELDS, IGNORED_FIELDS, TRAINING_FIELDS, classify
from flame_ext.checks.config.misread import installed_reading_problems, misread_fields, recorded_source_problems
from flame_ext.checks.config.native import native_config_problems, native_fields, refuse_config_mismatch
from flame_ext.checks.config.normalize import normalized_config

__all__ = [
    "COMPUTE_FIELDS",
    "TRAINING_FIELDS",
    "IGNORED_FIELDS",
    "classify",
    "read_config_file",
    "normalized_config",
    "compare_configs",
    "misread_fields",
    "installed_reading_problems",
    "recorded_source_problems",
    "native_fields",
    "native_config_problems",
    "refuse_config_mismatch",
]
