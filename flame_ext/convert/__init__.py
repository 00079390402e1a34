"""Conversion between Hugging Face folders and DCP checkpoints, both ways, streaming.

The names below are imported on first use: a command that needs one direction (``flame-ext convert``
imports ``convert.distributed`` and ``convert.hf_to_dcp``) does not load the other's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flame_ext.command_options import ConvertOptions, ToHFOptions
    from flame_ext.convert.dcp_to_hf import convert_dcp_to_hf
    from flame_ext.convert.hf_to_dcp import convert_hf_to_dcp

__all__ = ["ConvertOptions", "convert_hf_to_dcp", "ToHFOptions", "convert_dcp_to_hf"]

_HOMES = {
    "ConvertOptions": "flame_ext.command_options",
    "convert_hf_to_dcp": "flame_ext.convert.hf_to_dcp",
    "ToHFOptions": "flame_ext.command_options",
    "convert_dcp_to_hf": "flame_ext.convert.dcp_to_hf",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'flame_ext.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
