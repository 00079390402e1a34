"""``flame-ext convert --layout torchtitan:<module>``: torchtitan's own key names, through the model's own
state-dict adapter, a layer at a time.

What a user checks: the native DCP holds exactly what torchtitan's adapter gives when applied to the whole HF
state dict at once (same keys, same bytes), for a dense model (llama3: q/k permuted), a tied one (qwen3) and two
MoE models (qwen3 MoE, deepseek_v3: experts stacked per layer); the manifest names the native model and records
every tensor's fingerprint under its native key. The models are torchtitan 0.3's debug configs cut to 2-3
layers (``tests/support/titan_native.py``); the HF folders are written through torchtitan's ``to_hf``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.cli import run_cli
from support.titan_hosts import titan_generation
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import InputError
from flame_ext.io.dcp import row_blocks
from flame_ext.io.specs import TensorSpec, dtype_name

titan03 = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3 API (state-dict adapters)")
LAYOUT = "torchtitan:support.titan_native"  # the test registry (tests/support/titan_native.py), as --module
MODELS = ["llama3_tiny", "qwen3_tiny", "qwen3_moe_tiny", "deepseek_v3_tiny"]
# Row blocks that split most weight matrices into several (checked in the test), as a 7B's projections span
# several 256 MB blocks; much smaller blocks only add DCP writes (at 4 KB: 20-60 CPU-s a model).
BLOCK = 64 * 1024
# make test-fast converts llama3 (dense, q/k permuted) and leaves the tied and MoE models to make test (3-8 CPU-s
# a model).
ONE_FAST = [MODELS[0], *(pytest.param(fn, marks=pytest.mark.slow) for fn in MODELS[1:])]


class _Folders(dict):
    """function -> its HF folder, written on first use (a run of the fast tests asks for two of the four)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, function: str) -> Path:
        from support import titan_native

        self[function] = titan_native.write_hf_folder(function, self.root / function)
        return self[function]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    return _Folders(tmp_path_factory.mktemp("native-hf"))


def convert_native(hf: Path, out: Path, function: str, **kw) -> Path:
    kw.setdefault("reference", False)
    convert_hf_to_dcp(
        ConvertOptions(model=str(hf), checkpoint=str(out), layout=LAYOUT, titan_config=function, progress=False, **kw)
    )
    return out


def dcp_state(folder: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(folder, folder.parent / (folder.name + ".pt"))
    return torch.load(folder.parent / (folder.name + ".pt"))


@titan03
@pytest.mark.parametrize("function", ONE_FAST)
def test_native_dcp_equals_torchtitans_adapter_on_the_whole_state_dict(hf_folders, tmp_path, function):
    from support import titan_native

    out = convert_native(hf_folders[function], tmp_path / "dcp", function, buffer_bytes=BLOCK)
    mine = dcp_state(out)
    split = [k for k, v in mine.items() if len(row_blocks(TensorSpec(tuple(v.shape), dtype_name(v.dtype)), BLOCK)) > 1]
    assert len(split) >= len([v for v in mine.values() if v.dim() >= 2]) // 2, split
    theirs = titan_native.whole_adapter_state(function, hf_folders[function])
    manifest = json.loads((out / "flame_ext.json").read_text())
    # Keys torchtitan's adapter maps nothing to (qwen3 MoE's load-balancing bias) are the model's own initial
    # values, listed as fresh; every other key is the adapter's, byte for byte.
    assert sorted(set(mine) - set(theirs)) == manifest["fresh_keys"]
    assert set(theirs) <= set(mine)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
    assert manifest["layout"] == LAYOUT
    assert manifest["native"]["module"] == "support.titan_native" and manifest["native"]["config"] == function
    assert set(manifest["fingerprints"]["tensors"]) == set(mine)


@titan03
def test_every_key_the_model_asks_for_is_written(hf_folders, tmp_path):
    """The DCP holds exactly the keys (and shapes) the native model's state_dict asks for."""
    from support import titan_native

    out = convert_native(hf_folders["qwen3_moe_tiny"], tmp_path / "dcp", "qwen3_moe_tiny")
    with torch.device("meta"):
        model = titan_native.model_spec("qwen3_moe_tiny").model.build()
    asked = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in dcp_state(out).items()} == asked


@titan03
def test_dtype_cast_after_the_adapter(hf_folders, tmp_path):
    from support import titan_native

    out = convert_native(hf_folders["llama3_tiny"], tmp_path / "dcp", "llama3_tiny", dtype="bfloat16")
    theirs = titan_native.whole_adapter_state("llama3_tiny", hf_folders["llama3_tiny"])
    mine = dcp_state(out)
    assert all(torch.equal(mine[k], v.to(torch.bfloat16)) for k, v in theirs.items())


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
@titan03
def test_the_cli_refuses_a_missing_config_function_in_one_line(hf_folders, tmp_path):
    proc = run_cli("convert", "--model", str(hf_folders["llama3_tiny"]), "--checkpoint", str(tmp_path / "o"),
                   "--layout", "torchtitan:llama3")  # fmt: skip
    assert proc.returncode == 2 and "needs --titan-config" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("convert", "--model", str(hf_folders["llama3_tiny"]), "--checkpoint", str(tmp_path / "o"),
                   "--layout", "torchtitan:llama3", "--titan-config", "no_such_config")  # fmt: skip
    assert proc.returncode == 2 and "no_such_config" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_titan_config_without_the_native_layout_is_refused():
    with pytest.raises(InputError, match="give both"):
        ConvertOptions(model="m", checkpoint="c", titan_config="llama3_debugmodel")


@pytest.mark.skipif(titan_generation() != "0.1", reason="torchtitan 0.1 (flame's pin) only")
def test_torchtitan_01_refuses_the_native_layout_in_one_line(tiny_model, tmp_path):
    proc = run_cli("convert", "--model", str(tiny_model), "--checkpoint", str(tmp_path / "o"),
                   "--layout", "torchtitan:llama3", "--titan-config", "llama3_debugmodel")  # fmt: skip
    assert proc.returncode == 2 and "needs torchtitan >= 0.3" in proc.stderr and "Traceback" not in proc.stderr


def cli_env() -> dict[str, str]:
    """The test registry importable by the CLI's own process."""
    tests = str(Path(__file__).parents[1])
    return {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}


@titan03
@pytest.mark.slow
def test_deepseek_v3_converts_with_the_hf_reference_loss(hf_folders, tiny_model, tmp_path):
    """The config.json written for the torchtitan config builds in transformers (one group of every expert,
    not its default of 8) and its reference loss is recorded."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(hf_folders["deepseek_v3_tiny"], hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_model / name, hf / name)  # byte-level: every id fits the 2048-token vocabulary
    proc = run_cli("convert", "--model", str(hf), "--checkpoint", str(tmp_path / "dcp"), "--layout", LAYOUT,
                   "--titan-config", "deepseek_v3_tiny", env=cli_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HF reference loss" in proc.stdout + proc.stderr
    reference = json.loads((tmp_path / "dcp" / "flame_ext.json").read_text())["reference"]
    assert 7.0 < reference["loss_mean"] < 8.5  # about ln(2048) = 7.6 for a random model


@titan03
@pytest.mark.slow
def test_a_router_hf_cannot_express_is_refused_in_one_line(hf_folders, tmp_path):
    """torchtitan's deepseek_v3 debug router scores with a softmax, transformers' deepseek_v3 only with a
    sigmoid: refused before anything is written, naming the field and both values; allowed by the override."""
    hf, out = hf_folders["deepseek_v3_tiny"], tmp_path / "o"
    args = ("convert", "--model", str(hf), "--checkpoint", str(out), "--layout", LAYOUT,
            "--titan-config", "deepseek_v3_softmax_tiny", "--no-reference")  # fmt: skip
    proc = run_cli(*args, env=cli_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "config mismatch" in x]
    assert "scoring_func" in line and "'softmax'" in line and "'sigmoid'" in line
    assert "--allow-config-mismatch scoring_func" in line
    assert not out.exists()
    proc = run_cli(*args, "--allow-config-mismatch", "scoring_func", env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scoring_func" in proc.stdout + proc.stderr


@titan03
@pytest.mark.parametrize("function", ONE_FAST)
def test_hf_to_native_to_hf_is_bit_exact(hf_folders, tmp_path, function):
    """to-hf reads the native model from flame_ext.json and maps back through the adapter's to_hf."""
    from safetensors.torch import load_file

    from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf

    hf = hf_folders[function]
    out = convert_native(hf, tmp_path / "dcp", function)
    summary = convert_dcp_to_hf(
        ToHFOptions(checkpoint=str(out), config=str(hf), out=str(tmp_path / "back"), progress=False, buffer_bytes=4096)
    )
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    fresh = json.loads((out / "flame_ext.json").read_text())["fresh_keys"]
    assert all(any(note.startswith(k) for note in summary.notes) for k in fresh)  # said, not written


@titan03
@pytest.mark.slow
@pytest.mark.parametrize("function", ["llama3_tiny", "qwen3_moe_tiny"])
def test_two_ranks_convert_and_export_as_one_process_does(hf_folders, tmp_path, monkeypatch, function):
    """Under torchrun (gloo) each rank converts whole layers; the checkpoint and the HF folder equal one process's."""
    from safetensors.torch import load_file
    from support import torchrun as runner

    tests = str(Path(__file__).parents[1])
    monkeypatch.setitem(runner.ENV, "PYTHONPATH", os.pathsep.join([tests, runner.ENV.get("PYTHONPATH", "")]))
    hf = hf_folders[function]
    single = convert_native(hf, tmp_path / "single", function)
    out = tmp_path / "dist"
    proc, _ = runner.torchrun(2, "-m", "flame_ext.cli", "convert", "--model", str(hf), "--checkpoint", str(out),
                              "--layout", LAYOUT, "--titan-config", function, "--no-reference")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.glob("__0_*.distcp")) and list(out.glob("__1_*.distcp"))  # both ranks wrote
    a, b = dcp_state(out), dcp_state(single)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    proc, _ = runner.torchrun(2, "-m", "flame_ext.cli", "to-hf", "--checkpoint", str(out), "--config", str(hf),
                              "--out", str(tmp_path / "back"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = load_file(str(hf / "model.safetensors"))
    y = {k: v for f in sorted((tmp_path / "back").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
