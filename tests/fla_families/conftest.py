"""Session fixtures for the fla tests: each family's HF folder and its conversion, built once on first use."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "titan")]  # fla_models; the titan helpers (_models)

from fla_models import require_fla, save_fla_model  # noqa: E402

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp  # noqa: E402
from flame_ext.convert.summary import Summary  # noqa: E402


@pytest.fixture(scope="session")
def fla_hf(tmp_path_factory) -> Callable[[str], Path]:
    """family -> the saved tiny model's folder."""
    require_fla()
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_fla_model(family, tmp_path_factory.mktemp("fla") / family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def fla_dcp(fla_hf, tmp_path_factory) -> Callable[[str], tuple[Path, Summary]]:
    """family -> its conversion with the defaults (flat keys, reference attempted) and the summary."""
    made: dict[str, tuple[Path, Summary]] = {}

    def get(family: str) -> tuple[Path, Summary]:
        if family not in made:
            out = tmp_path_factory.mktemp("fla-dcp") / family / "step-0"
            summary = convert_hf_to_dcp(ConvertOptions(model=str(fla_hf(family)), checkpoint=str(out), progress=False))
            made[family] = (out, summary)
        return made[family]

    return get
