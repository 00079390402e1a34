"""fla-org/flame's real converter file, stock and patched, on every fla family of the tests (FLAME_SRC only).

The CI-runnable twin is tests/fla_families/test_fla_patches.py, which does stock flame's steps itself. Here
flame's own ``flame/utils/convert_hf_to_dcp.py`` runs, from the FLAME_SRC checkout (stock) and from a patched
copy; each side converts every family in one process (tests/flame/run_converter.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from flame_src_env import flame_checkout  # noqa: F401 -- a fixture

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "fla_families"), str(HERE.parent / "titan")]

from _models import dcp_tensors  # noqa: E402
from fla_models import FAMILIES, require_fla, save_fla_model  # noqa: E402
from test_fla_patches import assert_same_tensors_flat_for_nested  # noqa: E402

from flame_ext.cli import main as cli_main  # noqa: E402


def _convert_all(flame_dir: Path, models: dict[str, Path], out: Path) -> None:
    converter = flame_dir / "flame" / "utils" / "convert_hf_to_dcp.py"
    pairs = [str(p) for name, model in models.items() for p in (model, out / name)]
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_converter.py"), str(converter), *pairs],
        cwd=flame_dir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_patched_flame_converter_matches_stock_flame_on_fla_families(flame_checkout, tmp_path):
    require_fla()
    models = {name: save_fla_model(name, tmp_path / "hf" / name) for name in sorted(FAMILIES)}
    patched = shutil.copytree(
        flame_checkout,
        tmp_path / "patched-flame",
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", "exp", "__pycache__"),
    )
    assert cli_main(["patch", "apply", str(patched)]) == 0
    _convert_all(flame_checkout, models, tmp_path / "stock")
    _convert_all(patched, models, tmp_path / "patched")
    for name in models:
        assert_same_tensors_flat_for_nested(
            dcp_tensors(tmp_path / "patched" / name), dcp_tensors(tmp_path / "stock" / name)
        )
