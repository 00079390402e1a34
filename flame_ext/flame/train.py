"""flame's training entry with the initial-load guard, without editing flame.

    cd /path/to/flame && torchrun --nproc_per_node=8 -m flame_ext.flame.train --job.config_file ... \\
        --checkpoint.validate_initial_load

does what the patched ``flame/train.py`` does: before flame's module runs, ``install()`` points the
names it builds from at flame-ext's (torchtitan's ``CheckpointManager`` -> the validating one, flame's
``JobConfig`` -> the one with the guard options, torchtitan's ``build_metrics_processor`` -> one that also
gives the new metric logger the guard's step-0 figures); then flame's ``flame.train`` runs as ``__main__``,
unchanged. flame offers no hook for any of them, so replacing the names it imports is the only way in; it
happens once, in this process only, before flame is imported.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["install", "main"]


def install() -> None:
    """Make flame's ``train.py`` build the validating CheckpointManager, the extended JobConfig, and a metric
    logger that receives the step-0 figures of the validated load.

    Must run before ``flame.train`` is imported (its ``from ... import`` lines copy the names); if it was
    imported already, its globals are updated too. Idempotent.
    """
    from flame_ext.flame.config import GuardOptionsMixin, flame_job_config, job_config_class

    current = flame_job_config()  # first: one clear message when no flame checkout is importable
    import flame.config_manager as flame_config
    import torchtitan.components.checkpoint as titan_checkpoint
    import torchtitan.components.metrics as titan_metrics

    manager = _flame_checkpoint_manager()
    extended = current if issubclass(current, GuardOptionsMixin) else job_config_class(current)
    build = titan_metrics.build_metrics_processor
    if not getattr(build, "gives_step0_figures", False):
        build = titan_metrics.build_metrics_processor = _giving_step0_figures(build)
    titan_checkpoint.CheckpointManager = manager
    flame_config.JobConfig = extended
    loaded: Any = sys.modules.get("flame.train")  # flame's module: attributes set as flame's own code reads them
    if loaded is not None:
        loaded.CheckpointManager = manager
        loaded.JobConfig = extended
        loaded.build_metrics_processor = build


_BUILT: weakref.WeakSet = weakref.WeakSet()  # the checkpoint managers flame built in this process


@functools.cache
def _flame_checkpoint_manager() -> type:
    """The validating manager, remembered when built: flame builds its metric logger after loading, and
    (unpatched) never hands it to the manager, so the step-0 figures wait for ``_giving_step0_figures``."""
    from flame_ext.titan import ValidatingCheckpointManager

    class FlameCheckpointManager(ValidatingCheckpointManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _BUILT.add(self)

    return FlameCheckpointManager


def _giving_step0_figures(build: Callable[..., Any]) -> Callable[..., Any]:
    """torchtitan's ``build_metrics_processor``, then the step-0 figures of each validated load to the new
    logger (what the patched train.py does with ``checkpoint.record_initial_load_metrics``)."""

    @functools.wraps(build)
    def build_metrics_processor(*args: Any, **kwargs: Any) -> Any:
        processor = build(*args, **kwargs)
        for manager in list(_BUILT):
            manager.record_initial_load_metrics(processor)
        return processor

    build_metrics_processor.gives_step0_figures = True  # type: ignore[attr-defined]
    return build_metrics_processor


def main(argv: Sequence[str] | None = None) -> int:
    """Install, then run ``flame.train`` as ``__main__`` with ``argv`` (default: this command's arguments)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # flame's train.py imports `custom_models` from its repository root; `python -m` puts the working
    # directory on sys.path, as flame's own `-m flame.train` does, so run this from the flame checkout.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from flame_ext.process import run_guarded

    return run_guarded(
        lambda _: _run(), None, debug=bool(os.environ.get("FLAME_EXT_DEBUG")), prog="flame_ext.flame.train"
    )


def _run() -> int:
    install()
    runpy.run_module("flame.train", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
