"""HF -> DCP -> HF: bit-exact round trips, strict loads into a meta-built model, dtypes, tied embeddings,
full training checkpoints back to HF, and the drop-in modules with flame's argument names.

Everything is real: transformers models saved with ``save_pretrained``, DCP folders written by the
converter and read back with ``torch.distributed.checkpoint.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from support.cli import run_cli
from support.models import meta_model
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.destination import FILES_RECORD

SMALL_BUFFER = 4096  # bytes: far below the tiny models' larger tensors, so they are written as row blocks


# ---------------------------------------------------------------- helpers


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, read with safetensors itself."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} appears in two shards"
                out[key] = f.get_tensor(key)
    assert out, f"no safetensors tensors in {folder}"
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(a: Path, b: Path) -> None:
    """Same keys, dtypes, shapes and bytes in two HF folders."""
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert ta[key].shape == tb[key].shape, key
        assert tensor_bytes(ta[key]) == tensor_bytes(tb[key]), f"{key}: bytes differ"


def convert(model: Path, out: Path, **kw) -> Path:
    kw.setdefault("reference", False)
    convert_hf_to_dcp(ConvertOptions(model=str(model), checkpoint=str(out), progress=False, **kw))
    return out


def to_hf(checkpoint: Path, config: Path, out: Path, **kw) -> Path:
    convert_dcp_to_hf(ToHFOptions(checkpoint=str(checkpoint), config=str(config), out=str(out), progress=False, **kw))
    return out


def dcp_chunks(folder: Path) -> dict[str, TensorStorageMetadata]:
    md = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def strict_load(model: torch.nn.Module, checkpoint: Path, prefix: str = "") -> None:
    """``dcp.load`` of everything the model asks for, failing on any missing key."""
    sd = model.state_dict()
    target = {prefix + k: v for k, v in sd.items()}
    dcp.load(target, checkpoint_id=str(checkpoint), planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)


@pytest.fixture(scope="module")
def sharded_chunked_dcp(sharded_model, tmp_path_factory) -> Path:
    """The 5-shard model converted with a 4 KiB buffer: its larger tensors are split into row blocks."""
    return convert(sharded_model, tmp_path_factory.mktemp("chunked") / "step-0", buffer_bytes=SMALL_BUFFER)


# ---------------------------------------------------------------- round trips


def test_round_trip_embedded_model_is_bit_exact(tiny_model, tiny_dcp, tmp_path):
    out = to_hf(tiny_dcp, tiny_model, tmp_path / "hf")
    assert_bit_exact(tiny_model, out)
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_model / "config.json").read_text())


@pytest.mark.parametrize(
    "chunked, read_buffer",
    [(False, None), (True, None), (True, 3000)],
    # the last reads blocks of 3000 bytes from a checkpoint stored in chunks of 1 KiB (4 KiB / 2 writers /
    # 2 blocks each): reads straddle stored chunks
    ids=["whole-tensors", "row-blocks", "row-blocks-read-in-other-blocks"],
)
def test_round_trip_sharded_model_is_bit_exact(sharded_model, sharded_chunked_dcp, chunked, read_buffer, tmp_path):
    checkpoint = sharded_chunked_dcp if chunked else convert(sharded_model, tmp_path / "dcp")
    kw = {"buffer_bytes": read_buffer} if read_buffer else {}
    out = to_hf(checkpoint, sharded_model, tmp_path / "hf", max_shard_bytes=40_000, **kw)
    assert len(list(out.glob("*.safetensors"))) > 1, "expected a sharded HF output"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(hf_tensors(out))
    assert_bit_exact(sharded_model, out)


def test_small_buffer_splits_tensors_into_row_blocks(sharded_chunked_dcp):
    chunks = dcp_chunks(sharded_chunked_dcp)
    split = {k: md for k, md in chunks.items() if len(md.chunks) > 1}
    assert split, "no tensor was split although the buffer is far below their size"
    for key, md in split.items():
        itemsize = md.properties.dtype.itemsize
        row_bytes = itemsize * int(torch.Size(md.size[1:]).numel())
        covered = 0
        for c in md.chunks:
            assert list(c.sizes[1:]) == list(md.size[1:]), f"{key}: blocks must be whole rows"
            assert c.sizes[0] * row_bytes <= max(SMALL_BUFFER, row_bytes), f"{key}: block larger than the buffer"
            covered += c.sizes[0]
        assert covered == md.size[0], f"{key}: blocks do not cover the tensor"


@pytest.mark.parametrize("which", ["embedded", "sharded-row-blocks"])
def test_dcp_loads_strictly_into_meta_built_model(which, request):
    names = ("tiny_model", "tiny_dcp") if which == "embedded" else ("sharded_model", "sharded_chunked_dcp")
    source, checkpoint = (request.getfixturevalue(n) for n in names)
    model = meta_model(source)
    # Flat layout: exactly the keys the model asks for, no more, no fewer.
    assert sorted(dcp_chunks(checkpoint)) == sorted(model.state_dict())
    strict_load(model, checkpoint)
    hf = hf_tensors(source)
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if "lm_head.weight" not in hf else {}
    for key, value in model.state_dict().items():
        assert torch.equal(value, hf[aliases.get(key, key)]), f"{key}: loaded value differs from the HF file"


# ---------------------------------------------------------------- what gets written: the model's plan


def _with_extra_tensor(sharded_model: Path, folder: Path) -> Path:
    """The sharded model plus one tensor no Olmo2 asks for (like the stray ``inv_freq`` of old exports)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(sharded_model, folder)
    save_file(
        {"model.rotary_emb.inv_freq": torch.arange(8.0)}, str(folder / "extra.safetensors"), metadata={"format": "pt"}
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.rotary_emb.inv_freq"] = "extra.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_writes_what_the_model_asks_for_not_what_the_files_hold(sharded_model, tmp_path):
    source = _with_extra_tensor(sharded_model, tmp_path / "extra")
    summary = convert_hf_to_dcp(
        ConvertOptions(model=str(source), checkpoint=str(tmp_path / "dcp"), reference=False, progress=False)
    )
    keys = dcp_chunks(tmp_path / "dcp")
    assert "model.rotary_emb.inv_freq" not in keys
    assert sorted(keys) == sorted(meta_model(sharded_model).state_dict())
    assert any("model.rotary_emb.inv_freq" in note for note in summary.notes)
    out = to_hf(tmp_path / "dcp", sharded_model, tmp_path / "hf")
    assert_bit_exact(sharded_model, out)


def test_keys_the_model_needs_but_the_files_lack_are_all_named_and_nothing_is_written(sharded_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from flame_ext.errors import CheckpointFormatError

    source = tmp_path / "incomplete"
    shutil.copytree(sharded_model, source)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    dropped = sorted(k for k in index["weight_map"] if k.endswith("post_attention_layernorm.weight"))
    assert len(dropped) == 2
    for key in dropped:
        shard = source / index["weight_map"].pop(key)
        kept = {k: v for k, v in load_file(str(shard)).items() if k != key}
        save_file(kept, str(shard), metadata={"format": "pt"})
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError) as err:
        convert(source, tmp_path / "dcp")
    assert all(key in str(err.value) for key in dropped)
    assert list(tmp_path.iterdir()) == [source]


def test_remote_code_refusal_stops_the_conversion_and_leaves_nothing(sharded_model, tmp_path):
    import shutil

    from flame_ext.errors import InputError

    source = tmp_path / "custom"
    shutil.copytree(sharded_model, source)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="--trust-remote-code"):
        convert(source, tmp_path / "dcp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom"]


# ---------------------------------------------------------------- dtype


def test_dtype_bfloat16_from_float32_source(sharded_model, tmp_path):
    hf = hf_tensors(sharded_model)
    assert {t.dtype for t in hf.values()} == {torch.float32}, "fixture must be fp32 for this test"
    checkpoint = convert(sharded_model, tmp_path / "bf16", dtype="bfloat16")
    chunks = dcp_chunks(checkpoint)
    assert {md.properties.dtype for md in chunks.values()} == {torch.bfloat16}
    model = meta_model(sharded_model).to(torch.bfloat16)
    strict_load(model, checkpoint)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, hf[key].to(torch.bfloat16)), key
    # to-hf keeps the checkpoint's dtype by default and records it in config.json
    out = to_hf(checkpoint, sharded_model, tmp_path / "hf", dtype="bfloat16")
    assert {t.dtype for t in hf_tensors(out).values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_dtype_auto_keeps_source_dtype(sharded_chunked_dcp, sharded_model):
    hf = hf_tensors(sharded_model)
    for key, md in dcp_chunks(sharded_chunked_dcp).items():
        assert md.properties.dtype == hf[key].dtype, key


# ---------------------------------------------------------------- tied embeddings


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """A tiny Llama with tie_word_embeddings=True, saved by transformers (which omits lm_head.weight)."""
    from support.models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("tied") / "llama",
        "llama",
        seed=1,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def test_tied_embeddings_convert_load_and_come_back(tied_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    source = hf_tensors(tied_llama)
    assert "lm_head.weight" not in source and "model.embed_tokens.weight" in source
    checkpoint = convert(tied_llama, tmp_path / "dcp")
    keys = dcp_chunks(checkpoint)
    # What the model asks for on load: both names of the tied tensor.
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(keys)
    model = meta_model(tied_llama)
    assert sorted(keys) == sorted(model.state_dict())
    strict_load(model, checkpoint)
    assert torch.equal(model.lm_head.weight, source["model.embed_tokens.weight"])

    out = to_hf(checkpoint, tied_llama, tmp_path / "hf")
    assert "lm_head.weight" not in hf_tensors(out)
    assert_bit_exact(tied_llama, out)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tied_llama).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(expected, got)


# ---------------------------------------------------------------- full training checkpoints -> HF


def _training_state(model: torch.nn.Module) -> dict:
    """A real optimizer state (one AdamW step) keyed by parameter name, as torchtitan saves it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return get_optimizer_state_dict(model, opt)


@pytest.mark.parametrize("generation", ["titan03-flat", "titan01-nested"])
def test_to_hf_extracts_model_from_full_training_checkpoint(generation, sharded_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded_model)
    hf_before = {k: v.clone() for k, v in model.state_dict().items()}
    optim = _training_state(model)  # changes the weights: restore the file's values for the checkpoint
    model.load_state_dict(hf_before)
    extra = {
        "optimizer": optim,
        "lr_scheduler": {"last_epoch": 7, "base_lrs": [1e-3]},
        "train_state": {"step": 1000, "ntokens_seen": 123456},
        "dataloader": {"dp_rank_0": b"\x00\x01"},
    }
    if generation == "titan03-flat":  # model keys flat, beside optimizer.* / train_state.* ...
        state = {**model.state_dict(), **extra}
    else:  # torchtitan 0.1 full checkpoint: model keys under "model."
        state = {"model": model.state_dict(), **extra}
    checkpoint = tmp_path / "checkpoint" / "step-1000"
    dcp.save(state, checkpoint_id=str(checkpoint), no_dist=True)
    keys = set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any(k.startswith("optimizer.state.") for k in keys) and "train_state.step" in keys

    out = to_hf(checkpoint, sharded_model, tmp_path / "hf")
    assert_bit_exact(sharded_model, out)


# ---------------------------------------------------------------- drop-in modules


@pytest.mark.slow  # the three drop-ins in fresh processes; make test-fast leaves it out
def test_drop_in_modules_with_flames_argument_names(sharded_model, tmp_path):
    dump = tmp_path / "exp"
    step0 = dump / "checkpoint" / "step-0"
    r = run_cli(
        "--model",
        str(sharded_model),
        "--checkpoint",
        str(step0),
        "--trust_remote_code",
        "--include_future_predictor",
        "--future_predictor_head_type",
        "mlp",
        "--no_reference",
        module="flame_ext.convert_hf_to_dcp",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((step0 / "flame_ext.json").read_text())
    assert manifest["future_predictor"] == "mlp" and manifest["fresh_keys"]
    assert set(manifest["fresh_keys"]) <= set(dcp_chunks(step0))

    tokenizer = tmp_path / "tokenizer"  # flame passes the tokenizer separately; its files are what gets copied
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    r = run_cli(
        "--path",
        str(dump),
        "--step",
        "0",
        "--config",
        str(sharded_model),
        "--tokenizer",
        str(tokenizer),
        module="flame_ext.convert_dcp_to_hf",
    )
    assert r.returncode == 0, r.stderr
    out = dump / "hf-step-0"
    assert "future_predictor.fc1.weight" in r.stdout, "the fresh head is not part of the HF model: say so"
    assert_bit_exact(sharded_model, out)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 512}'


# ---------------------------------------------------------------- untrusted sources


def _poison(model: Path, key: str, value: float) -> None:
    """Put a non-finite value into one tensor of a copied HF folder, as a diverged run would leave it."""
    from safetensors.torch import load_file, save_file

    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key].view(-1)[tensors[key].numel() // 2] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.slow  # converts, diagnoses and converts back in fresh processes; make test-fast leaves it out
def test_non_finite_source_values_are_copied_faithfully_and_named(sharded_model, tmp_path):
    import shutil

    model = Path(shutil.copytree(sharded_model, tmp_path / "model"))
    _poison(model, "model.layers.1.mlp.up_proj.weight", float("inf"))
    _poison(model, "model.norm.weight", float("nan"))
    out = tmp_path / "step-0"
    r = run_cli("convert", "--model", str(model), "--checkpoint", str(out), "--buffer-mb", "1")
    assert r.returncode == 0, r.stderr
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning: 2 tensors"))
    assert "model.layers.1.mlp.up_proj.weight" in warning and "model.norm.weight" in warning, warning
    assert any("reference loss not computed" in line for line in r.stderr.splitlines()), r.stderr
    manifest = json.loads((out / "flame_ext.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert manifest["nonfinite_keys"] == ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert manifest["reference"] is None and "NaN or Inf" in manifest["reference_note"]
    source, written = hf_tensors(model), _dcp_tensors(out)
    assert all(torch.equal(written[k].view(torch.uint8), source[k].view(torch.uint8)) for k in source)

    back = tmp_path / "back"
    r = run_cli("to-hf", "--checkpoint", str(out), "--config", str(model), "--out", str(back))
    assert r.returncode == 0, r.stderr
    assert "warning: 2 tensors" in r.stderr and "model.norm.weight" in r.stderr, r.stderr
    assert all(torch.equal(hf_tensors(back)[k].view(torch.uint8), source[k].view(torch.uint8)) for k in source)


def _dcp_tensors(folder: Path) -> dict[str, torch.Tensor]:
    md = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.items()}
    dcp.load(sd, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)
    return sd


def test_to_hf_copies_every_side_file_whatever_its_name(sharded_model, sharded_chunked_dcp, tmp_path):
    import os
    import shutil

    source = Path(shutil.copytree(sharded_model, tmp_path / "source"))
    side = {
        "chat_template.jinja": "{{ messages }}",
        "tokenizer.model": "\x00\x01sentencepiece",
        "vocab.txt": "a\nb\n",
        "preprocessor_config.json": "{}",
        "README.md": "# a model",
    }
    for name, text in side.items():
        (source / name).write_text(text)
    (tmp_path / "secret.txt").write_text("not for the output")
    os.symlink(tmp_path / "secret.txt", source / "added_tokens.json")  # leads out of the folder: not copied
    os.symlink(source / "vocab.txt", source / "vocab_link.txt")  # stays inside: copied as a file
    (source / "original").mkdir()  # a subfolder (other formats of the model): not copied
    (source / "original" / "params.json").write_text("{}")
    (source / "consolidated.pth").write_bytes(b"weights")
    out = tmp_path / "out"
    summary = convert_dcp_to_hf(ToHFOptions(str(sharded_chunked_dcp), str(source), str(out), progress=False))
    written_here = {"config.json", FILES_RECORD}  # what to-hf writes itself besides the weights
    copied = {p.name for p in out.iterdir()} - {p.name for p in out.glob("model*.safetensors*")} - written_here
    assert copied == set(side) | {"vocab_link.txt", "generation_config.json"} & {p.name for p in source.iterdir()}
    assert all((out / name).read_text() == text for name, text in side.items())
    assert not (out / "vocab_link.txt").is_symlink()
    assert set(json.loads((out / FILES_RECORD).read_text())["files"]) == {p.name for p in out.iterdir()} - {
        FILES_RECORD
    }
    assert any("added_tokens.json" in n and "outside the source folder" in n for n in summary.notes), summary.notes
