"""fla-org/flame integration: the JobConfig with the guard options, patches for a flame checkout, and a
launcher that runs flame's training with the guard without editing flame.

- ``flame_ext.flame.config``: ``JobConfig`` (flame's, plus ``[checkpoint] validate_initial_load`` etc.).
- ``flame_ext.flame.patching``: ``flame-ext patch apply|check|revert FLAME_DIR``.
- ``python -m flame_ext.flame.train ...``: flame's ``flame.train`` with the validating CheckpointManager.

Nothing here imports flame, torchtitan or transformers until it is used.
"""

FLAME_BASE_COMMIT = "e11e7be75b9e45e84dbecbe8f0efa27d6af7d101"
"""The fla-org/flame commit the patches are made against (2025-11-16)."""

__all__ = ["FLAME_BASE_COMMIT"]
