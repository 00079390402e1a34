"""Fixtures of the model tests: the tiny random models of ``arch_support``, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from arch_support import ARCHS, save_arch_model


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streamed-archs")
    return {arch: save_arch_model(arch, root / arch) for arch in ARCHS}
