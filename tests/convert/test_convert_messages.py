"""What `flame-ext convert` and flame's drop-in print, run as a user runs them: the time they state is the
command's wall time, and a model folder without a tokenizer gets advice, not transformers' bare error."""

from __future__ import annotations

import re
import shutil
import time

import pytest
from support.cli import run_cli

pytestmark = pytest.mark.slow  # commands in fresh processes (5-8 CPU-s a test); make test-fast leaves them out


def test_the_drop_in_states_the_commands_wall_time(tiny_model, tmp_path):
    """It printed "in 0.9 s" beside 16 s of wall time: the conversion alone, without start-up and imports."""
    started = time.perf_counter()
    proc = run_cli(
        "--model", str(tiny_model), "--checkpoint", str(tmp_path / "step-0"), module="flame_ext.convert_hf_to_dcp"
    )
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    (stated,) = [float(s) for s in re.findall(r"MB in ([\d.]+) s, peak RSS", proc.stdout)]
    # From the process's start to the line, so a little under what this test measures around the whole run.
    assert wall - 1.5 <= stated <= wall + 0.05, (stated, wall)


def test_a_model_folder_without_tokenizer_files_says_what_to_do(tiny_model, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, model / name)
    for args in (
        ("convert", "--model", str(model), "--checkpoint", str(tmp_path / "step-0")),
        ("reference", "--model", str(model), "--out", str(tmp_path / "ref.json")),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"flame-ext: error: {model}: no tokenizer files (none of tokenizer.json, ")
        assert "copy the tokenizer files from where the model came from into this folder" in proc.stderr
        assert "`flame-ext convert --no-reference` converts without the reference loss" in proc.stderr
        assert "Couldn't instantiate" not in proc.stderr
    assert not (tmp_path / "step-0").exists() and not (tmp_path / "ref.json").exists()
