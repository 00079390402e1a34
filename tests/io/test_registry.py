"""fla model registration: on demand, the package named when it is missing, the type list kept current."""

from __future__ import annotations

import subprocess
import sys

from flame_ext.io.registry import FLA_MODEL_TYPES

# A Python that cannot import fla, whatever is installed: what a user without flash-linear-attention has.
WITHOUT_FLA = (
    "import importlib.abc, sys\n"
    "class NoFla(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'fla' or name.startswith('fla.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NoFla())\n"
)


def test_the_type_list_names_every_fla_model_type_installed():
    import fla.models  # pinned in both test environments: missing is a failure

    installed = {getattr(fla.models, n).model_type for n in fla.models.__all__ if n.endswith("Config")}
    assert installed and installed <= FLA_MODEL_TYPES, sorted(installed - FLA_MODEL_TYPES)


def test_an_olmo_conversion_never_imports_fla(tiny_model):
    code = (
        "import sys\n"
        "from flame_ext.io.hf import build_meta_model, open_hf\n"
        f"build_meta_model(open_hf({str(tiny_model)!r}))\n"
        "print('fla' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_without_fla_an_fla_model_names_the_package_to_install(tmp_path):
    """A saved GLA config (no weights needed to be refused) and a user without fla: one line, exit 2."""
    import json

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "fla-gla"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 2}))
    save_file({"model.embeddings.weight": torch.zeros(4, 64)}, str(folder / "model.safetensors"))
    script = tmp_path / "no_fla.py"
    script.write_text(WITHOUT_FLA + "from flame_ext.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), "convert", "--model", str(folder), "--checkpoint", str(out), "--no-reference"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "model_type 'gla' is a flash-linear-attention (fla) model, and fla is not installed" in lines[0]
    assert "pip install flash-linear-attention" in lines[0]
    assert not out.exists()
