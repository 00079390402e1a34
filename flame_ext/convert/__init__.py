"""Conversion between Hugging Face folders and DCP checkpoints, both ways, streaming."""

from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

__all__ = ["ConvertOptions", "convert_hf_to_dcp", "ToHFOptions", "convert_dcp_to_hf"]
