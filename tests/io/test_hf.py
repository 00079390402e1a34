"""The HF side: the tensor index comes from file headers and agrees with safetensors; damaged folders are
named in one-line errors; ``.bin`` weights load only with ``weights_only=True``; remote code needs consent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from cli_support import run_cli
from safetensors import safe_open

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import CheckpointFormatError, InputError
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.hf import build_meta_model, map_tensor, open_hf, read_tensor
from flame_ext.io.specs import dtype_name


def test_index_from_headers_agrees_with_safetensors(sharded_model):
    hf = open_hf(sharded_model)
    assert hf.weight_format == "safetensors" and hf.path == sharded_model.resolve()
    seen = {}
    for file in sharded_model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                seen[key] = (file.name, tuple(t.shape), dtype_name(t.dtype))
    assert {k: (t.file.name, t.spec.shape, t.spec.dtype) for k, t in hf.tensors.items()} == seen


def test_read_tensor_whole_and_by_rows(sharded_model):
    hf = open_hf(sharded_model)
    t = hf.tensors["model.embed_tokens.weight"]
    with safe_open(str(t.file), framework="pt") as f:
        full = f.get_tensor(t.key)
    assert torch.equal(read_tensor(t), full)
    assert torch.equal(read_tensor(t, (3, 17)), full[3:17])


def test_read_tensor_matches_safetensors_for_every_dtype_and_shape(sharded_model, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    odd = {
        "bf16.matrix": torch.randn(9, 7, generator=g).to(torch.bfloat16),
        "f16.vector": torch.randn(13, generator=g).to(torch.float16),
        "f32.cube": torch.randn(4, 3, 5, generator=g),
        "i64.ids": torch.arange(6, dtype=torch.int64),
        "bool.mask": torch.tensor([True, False, True, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(sharded_model / "config.json", folder)
    save_file(odd, str(folder / "model.safetensors"))
    hf = open_hf(folder)
    for read in (read_tensor, map_tensor):
        for key, value in odd.items():
            got = read(hf.tensors[key])
            assert got.dtype == value.dtype and torch.equal(got, value), (read.__name__, key)
            if value.dim() and value.shape[0] > 2:
                assert torch.equal(read(hf.tensors[key], (1, 3)), value[1:3]), (read.__name__, key)


def test_mapped_tensor_is_a_private_view(sharded_model, tmp_path):
    """Writing to a mapped block changes the caller's copy, never the checkpoint file."""
    folder = _copy(sharded_model, tmp_path / "model")
    hf = open_hf(folder)
    t = hf.tensors["model.embed_tokens.weight"]
    before = t.file.read_bytes()
    block = map_tensor(t, (2, 5))
    block.fill_(7.0)
    assert torch.equal(map_tensor(t, (2, 5)), read_tensor(t, (2, 5)))
    assert t.file.read_bytes() == before
    assert block.untyped_storage().nbytes() == block.nbytes, (
        "exactly the block: torch's writer would copy a larger view"
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_folders_are_named_in_the_error(sharded_model, tmp_path):
    truncated = _copy(sharded_model, tmp_path / "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match=rf"{shard.name}: truncated"):
        open_hf(truncated)

    missing_shard = _copy(sharded_model, tmp_path / "missing-shard")
    victim = sorted(missing_shard.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointFormatError, match=rf"names shard {victim.name}, which is missing"):
        open_hf(missing_shard)

    no_config = _copy(sharded_model, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        open_hf(no_config)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(sharded_model / "config.json", no_weights)
    with pytest.raises(InputError, match="no weights"):
        open_hf(no_weights)

    with pytest.raises(InputError, match="no such folder"):
        open_hf(tmp_path / "absent" / "model")


def test_remote_code_needs_consent(sharded_model, tmp_path):
    folder = _copy(sharded_model, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="--trust-remote-code"):
        build_meta_model(open_hf(folder))


# ---------------------------------------------------------------- .bin checkpoints


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-format"])
def test_bin_state_dict_converts(zipfile, sharded_model, tmp_path):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(sharded_model / "config.json", folder)
    sd = _safetensors_state(sharded_model)
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    assert open_hf(folder).weight_format == "bin"

    out = tmp_path / "dcp"
    convert_hf_to_dcp(ConvertOptions(model=str(folder), checkpoint=str(out), reference=False, progress=False))
    assert sorted(read_dcp_metadata(out)) == sorted(sd)
    loaded = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    dcp.load(loaded, checkpoint_id=str(out), no_dist=True)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key


def _safetensors_state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


class _Payload:
    """An object whose unpickling runs code: it creates ``marker`` (an attacker would do worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_bin_is_refused_and_its_code_never_runs(sharded_model, tmp_path):
    def plant(folder: Path, marker: Path) -> Path:
        folder.mkdir()
        shutil.copy(sharded_model / "config.json", folder)
        torch.save(
            {"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Payload(marker)}, folder / "pytorch_model.bin"
        )
        return folder

    # Control: the payload is live; a plain (unsafe) load does run it.
    control_marker = tmp_path / "control-ran"
    control = plant(tmp_path / "control", control_marker)
    torch.load(control / "pytorch_model.bin", weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "attack-ran"
    evil = plant(tmp_path / "evil", marker)
    out = tmp_path / "out"
    r = run_cli("convert", "--model", str(evil), "--checkpoint", str(out), "--no-reference")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pytorch_model.bin" in lines[0] and "weights_only=True" in lines[0], r.stderr
    assert "Unsupported global" in lines[0] and "\x1b" not in lines[0]
    assert not marker.exists(), "the pickle's code ran"
    assert not out.exists()
