"""flame's training entry with the initial-load guard, without editing flame.

    cd /path/to/flame && torchrun --nproc_per_node=8 -m flame_ext.flame.train --job.config_file ... \\
        --checkpoint.validate_initial_load

does what the patched ``flame/train.py`` does: before flame's module runs, ``install()`` points the two
names it builds from at flame-ext's classes (torchtitan's ``CheckpointManager`` -> the validating one,
flame's ``JobConfig`` -> the one with the guard options); then flame's ``flame.train`` runs as
``__main__``, unchanged. flame offers no hook for either class, so replacing the names it imports is the
only way in; it happens once, in this process only, before flame is imported.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

__all__ = ["install", "main"]


def install() -> None:
    """Make flame's ``train.py`` build the validating CheckpointManager and the extended JobConfig.

    Must run before ``flame.train`` is imported (its ``from ... import`` lines copy the names); if it was
    imported already, its globals are updated too. Idempotent.
    """
    from flame_ext.flame.config import GuardOptionsMixin, flame_job_config, job_config_class

    current = flame_job_config()  # first: one clear message when no flame checkout is importable
    import flame.config_manager as flame_config
    import torchtitan.components.checkpoint as titan_checkpoint

    from flame_ext.titan import ValidatingCheckpointManager

    extended = current if issubclass(current, GuardOptionsMixin) else job_config_class(current)
    titan_checkpoint.CheckpointManager = ValidatingCheckpointManager
    flame_config.JobConfig = extended
    loaded = sys.modules.get("flame.train")
    if loaded is not None:
        loaded.CheckpointManager = ValidatingCheckpointManager
        loaded.JobConfig = extended


def main(argv: Sequence[str] | None = None) -> int:
    """Install, then run ``flame.train`` as ``__main__`` with ``argv`` (default: this command's arguments)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # flame's train.py imports `custom_models` from its repository root; `python -m` puts the working
    # directory on sys.path, as flame's own `-m flame.train` does, so run this from the flame checkout.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from flame_ext.errors import run_guarded

    return run_guarded(
        lambda _: _run(), None, debug=bool(os.environ.get("FLAME_EXT_DEBUG")), prog="flame_ext.flame.train"
    )


def _run() -> int:
    install()
    runpy.run_module("flame.train", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
