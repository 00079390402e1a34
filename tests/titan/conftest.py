"""Checkpoints for the guard's tests: the embedded model converted by flame-ext, and broken copies of it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _models import ADDED, DROPPED, RESHAPED, blank_data_files, rewrite_dcp, swap_layers  # noqa: E402


@pytest.fixture(scope="session")
def healthy(tiny_dcp: Path) -> Path:
    """The embedded model as `flame-ext convert` writes it (flat keys, flame_ext.json with the reference)."""
    return tiny_dcp


@pytest.fixture(scope="session")
def broken_keys(tiny_dcp: Path, tmp_path_factory) -> Path:
    """Two keys missing, one unexpected, one reshaped; data files emptied, so reading any tensor would fail."""

    def edit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in sd.items() if k not in DROPPED}
        out[ADDED] = sd["model.layers.0.self_attn.q_proj.weight"].clone()
        out[RESHAPED] = torch.ones(sd[RESHAPED].shape[0] + 8)
        return out

    folder = rewrite_dcp(tiny_dcp, tmp_path_factory.mktemp("broken") / "keys", edit)
    blank_data_files(folder)
    return folder


@pytest.fixture(scope="session")
def swapped(tiny_dcp: Path, tmp_path_factory) -> Path:
    """Every key present with the right shape, but layers 0 and 1 exchanged: only the loss can tell."""
    return rewrite_dcp(tiny_dcp, tmp_path_factory.mktemp("broken") / "swapped", swap_layers)


@pytest.fixture(scope="session")
def nested(tiny_model: Path, tmp_path_factory) -> Path:
    """The layout flame's stock converter writes ({"model": state_dict} -> model.-prefixed keys)."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    out = tmp_path_factory.mktemp("nested") / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(tiny_model), checkpoint=str(out), layout="nested", progress=False))
    return out


# The trained tiny models of the diagnose catalogue (cached across sessions), for the value catalogue.
sys.path.insert(0, str(Path(__file__).parents[1]))
from diagnose.conftest import hf_models, tied_model  # noqa: E402, F401
