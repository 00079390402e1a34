"""The commands' options checked where they are declared: the reference device (chosen, and a ``cuda`` request
refused in one line where torch sees no GPU), the default device of every form alike."""

from __future__ import annotations

import pytest
import torch
from support.cli import run_cli

from flame_ext.command_options import ConvertOptions, ReferenceOptions
from flame_ext.errors import InputError
from flame_ext.model.reference_loss import reference_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: cuda is a valid request")


def test_auto_runs_the_reference_where_torch_sees_a_gpu_else_on_the_cpu():
    assert reference_device("cpu") == torch.device("cpu")
    assert reference_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_every_form_defaults_to_auto(tiny_model, tmp_path):
    """The API, the CLI and the reference command start from the same default (they once differed: cpu, auto)."""
    assert ConvertOptions(model=str(tiny_model), checkpoint=str(tmp_path / "c")).reference_device == "auto"
    assert ReferenceOptions(model=str(tiny_model), out=str(tmp_path / "r.json")).reference_device == "auto"


@no_gpu
@pytest.mark.parametrize("command", ["convert", "reference"])
def test_a_cuda_request_without_a_gpu_is_one_line_and_nothing_is_written(command, tiny_model, tmp_path):
    out = tmp_path / "out"
    where = ["--checkpoint", str(out)] if command == "convert" else ["--out", str(out)]
    r = run_cli(command, "--model", str(tiny_model), *where, "--reference-device", "cuda")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "flame-ext: error: --reference-device cuda: torch sees no GPU here; use cpu or auto"
    ]
    assert not out.exists()


@no_gpu
def test_a_cuda_request_is_refused_by_the_options_themselves(tiny_model, tmp_path):
    with pytest.raises(InputError, match="torch sees no GPU here"):
        ConvertOptions(model=str(tiny_model), checkpoint=str(tmp_path / "c"), reference_device="cuda")
    with pytest.raises(InputError, match="torch sees no GPU here"):
        reference_device("cuda")
    # without the reference nothing runs on the device: no reason to refuse
    ConvertOptions(model=str(tiny_model), checkpoint=str(tmp_path / "c"), reference_device="cuda", reference=False)
