"""transformers' log and progress bars kept out of a report, and put back exactly as they were.

Putting them back means the state found, not "on": when flame-ext has switched huggingface_hub's bars off
through ``HF_HUB_DISABLE_PROGRESS_BARS`` (``cli.quiet_progress_bars``, stderr not a terminal), turning them
on again makes huggingface_hub warn "Cannot enable progress bars" on every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["transformers_quiet"]


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers at ERROR verbosity with its progress bars off inside the block; both restored after."""
    from transformers.utils import logging as tf_logging

    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
