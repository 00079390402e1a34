"""The HF side: the tensor index comes from file headers and agrees with safetensors; damaged folders are
named in one-line errors; ``.bin`` weights load only with ``weights_only=True``; remote code needs consent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from support.cli import run_cli

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


# ---------------------------------------------------------------- headers, indexes and configs as untrusted data


def _write_safetensors(file: Path, header: dict | str, data: bytes) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return file


def _header_folder(tmp_path: Path, name: str, header: dict | str, data: bytes, config: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(config, folder / "config.json")
    _write_safetensors(folder / "model.safetensors", header, data)
    return folder


def _two(a: list[int] | None = None, b: list[int] | None = None, **change) -> dict:
    """A header of two float16 vectors of 3 values each (12 bytes of data), with entries changed."""
    h = {
        "w1": {"dtype": "F16", "shape": [3], "data_offsets": a or [0, 6]},
        "w2": {"dtype": "F16", "shape": [3], "data_offsets": b or [6, 12]},
    }
    for key, fields in change.items():
        h[key] = fields if not isinstance(fields, dict) else {**h.get(key, {}), **fields}
    return h


HEADER_CASES = {
    "gap between spans": (_two(b=[8, 14]), 14, "belong to no tensor"),
    "spans overlap": (_two(b=[4, 10]), 12, "overlaps"),
    "offsets past the data": (_two(b=[6, 12]), 10, "truncated"),
    "bytes after the last tensor": (_two(), 20, "after its last tensor"),
    "offset a string": (_two(b=["6", 12]), 12, "data_offsets"),
    "three offsets": (_two(b=[6, 9, 12]), 12, "data_offsets"),
    "offsets reversed": (_two(b=[12, 6]), 12, "end before they start"),
    "bool in shape": (_two(w2={"shape": [True, 3]}), 12, "shape"),
    "shape a number": (_two(w2={"shape": 3}), 12, "shape"),
    "span not shape x dtype": (_two(w2={"shape": [2]}), 12, "declares 6 bytes"),
    "unknown dtype": (_two(w2={"dtype": "F12"}), 12, "dtype"),
    "dtype lowercase": (_two(w2={"dtype": "f16"}), 12, "dtype"),
    "entry a list": (_two(w2=[6, 12]), 12, "not an object"),
    "metadata a list": (_two(__metadata__=["format", "pt"]), 12, "__metadata__"),
    "metadata value an int": (_two(__metadata__={"step": 3}), 12, "__metadata__"),
    "key twice": (
        '{"w1": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}, '
        '"w1": {"dtype": "F16", "shape": [3], "data_offsets": [6, 12]}}',
        12,
        "appears twice",
    ),
    "header a list": ("[]", 12, "not a JSON object"),
}


@pytest.mark.parametrize("name", list(HEADER_CASES))
def test_safetensors_headers_are_checked_as_the_format_does(name, sharded_model, tmp_path):
    header, n_data, words = HEADER_CASES[name]
    folder = _header_folder(tmp_path, "m", header, bytes(range(n_data)), sharded_model / "config.json")
    with pytest.raises(CheckpointFormatError) as info:
        open_hf(folder)
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message and words in message, message
    from safetensors.torch import load_file

    if name not in ("key twice",):  # the library keeps the last of two same keys; flame-ext refuses them
        with pytest.raises(Exception):  # control: the safetensors library refuses the same file
            load_file(str(folder / "model.safetensors"))


def test_sound_headers_however_ordered_read_as_the_library_reads_them(sharded_model, tmp_path):
    from safetensors.torch import load_file

    data = torch.arange(6, dtype=torch.float16).numpy().tobytes()
    header = {
        "w2": _two()["w2"],
        "__metadata__": {"format": "pt"},
        "w1": _two()["w1"],
        "empty": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [6, 6]},
    }
    folder = _header_folder(tmp_path, "m", header, data, sharded_model / "config.json")
    hf = open_hf(folder)
    expected = load_file(str(folder / "model.safetensors"))
    assert set(hf.tensors) == set(expected)
    assert all(torch.equal(read_tensor(hf.tensors[k]), v) for k, v in expected.items())


def test_fifo_shard_is_refused_without_blocking(sharded_model, tmp_path):
    import os

    folder = Path(shutil.copytree(sharded_model, tmp_path / "m"))
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        open_hf(folder)


INDEX_CASES = {
    "weight_map a string": ("model-00001.safetensors", "no weight_map object"),
    "shard name a number": ({"model.norm.weight": 1}, "not a shard file name"),
    "shard outside the folder": ({"model.norm.weight": "../elsewhere.safetensors"}, "outside the model folder"),
    "absolute shard": ({"model.norm.weight": "/tmp/x.safetensors"}, "outside the model folder"),
    "key in another shard": (None, "its header does not"),
}


@pytest.mark.parametrize("name", list(INDEX_CASES))
def test_weight_maps_are_checked(name, sharded_model, tmp_path):
    folder = Path(shutil.copytree(sharded_model, tmp_path / "m"))
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    value, words = INDEX_CASES[name]
    if value is None:  # a real key, attributed to a real shard that does not hold it
        shards = sorted(set(index["weight_map"].values()))
        key = next(k for k, v in index["weight_map"].items() if v == shards[0])
        index["weight_map"][key] = shards[1]
    else:
        index["weight_map"] = value if not isinstance(value, dict) else {**index["weight_map"], **value}
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError) as info:
        open_hf(folder)
    assert "\n" not in str(info.value) and words in str(info.value), str(info.value)


CONFIG_CASES = {
    "layers zero": ({"num_hidden_layers": 0}, "num_hidden_layers is 0"),
    "heads a float": ({"num_attention_heads": 4.0}, "num_attention_heads is 4.0"),
    "vocab a string": ({"vocab_size": "260"}, "vocab_size is '260'"),
    "kv heads true": ({"num_key_value_heads": True}, "num_key_value_heads is True"),
    "nested size negative": ({"text_config": {"hidden_size": -8}}, "text_config.hidden_size is -8"),
    "hidden huge": ({"hidden_size": 4096 * 64}, "implies at least"),
    "layers huge": ({"num_hidden_layers": 30_000}, "implies at least"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_configs_are_checked_before_a_model_is_built(name, sharded_model, tmp_path):
    import time

    folder = Path(shutil.copytree(sharded_model, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    change, words = CONFIG_CASES[name]
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError) as info:
        build_meta_model(open_hf(folder))
    assert time.perf_counter() - start < 1.0, "refused only after building"
    assert "\n" not in str(info.value) and "config.json" in str(info.value) and words in str(info.value)


def test_config_not_an_object(sharded_model, tmp_path):
    folder = Path(shutil.copytree(sharded_model, tmp_path / "m"))
    (folder / "config.json").write_text('"olmo2"')
    with pytest.raises(CheckpointFormatError, match="holds a JSON str, not an object"):
        open_hf(folder)
