"""The streamed reference forward equals transformers' whole-model forward, architecture by architecture.

Each model is a tiny random one saved with ``save_pretrained``; the whole-model side is
``from_pretrained`` + forward, exactly what the reference used before streaming.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import torch
from arch_support import ARCHS, MAY_FALL_BACK, arch_config, token_ids
from safetensors.torch import load_file, save_file
from support.cli import run_cli

from flame_ext.errors import CheckpointFormatError
from flame_ext.io.hf import open_hf
from flame_ext.model.reference_loss import _losses_whole, reference_losses
from flame_ext.model.streamed import streamed_model


def _ids(rows: int = 2, length: int = 64) -> torch.Tensor:
    return token_ids(rows, length)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.no_grad()
def test_streamed_loss_equals_the_whole_model(arch_models, arch, dtype):
    hf = open_hf(str(arch_models[arch]))
    ids = _ids()
    streamed, _, notes = reference_losses(hf, ids, dtype)
    whole, _ = _losses_whole(hf, ids, dtype, False)
    if arch in MAY_FALL_BACK:
        assert all("whole model" in n for n in notes), notes
    else:
        assert notes == [], notes  # it streamed; no fallback
    # Same kernels on the same values in the same order: equal to float rounding of the mean (1e-4 nats
    # promised; measured 0 on every architecture here).
    assert abs(streamed.mean().item() - whole.mean().item()) < 1e-4
    assert torch.allclose(streamed, whole, atol=1e-5 if dtype == "float32" else 1e-2)


def _block_bytes(hf, prefix: str) -> int:
    return sum(t.spec.nbytes for k, t in hf.tensors.items() if k.startswith(prefix))


@torch.no_grad()
def test_one_layer_is_read_ahead_and_no_more(arch_models):
    """Each block is dropped after it ran; while one computes the next is read, and never more than two
    layers' weights are held at once."""
    hf = open_hf(str(arch_models["llama_gqa"]))
    with streamed_model(hf, "float32") as sm:
        sm.module(_ids())
        after = [p.device.type for p in sm.module.model.layers.parameters()]
    total = sum(t.spec.nbytes for t in hf.tensors.values())
    per_layer = _block_bytes(hf, "model.layers.0.")
    embed = hf.tensors["model.embed_tokens.weight"].spec.nbytes
    assert set(after) == {"meta"}  # every layer dropped after it ran
    assert sm.largest_block == max(per_layer, embed)
    assert sm.most_held == 2 * per_layer  # a layer and the next one read ahead (the embedding is smaller)
    assert sm.bytes_read == total  # each tensor read once
    assert not [t for t in threading.enumerate() if t.name.startswith("flame-ext-read-ahead")]


@torch.no_grad()
def test_an_embedding_larger_than_two_layers_is_never_held_beside_one(tmp_path):
    """A 7B's embedding is the size of two layers or more: the first layer is read after it ran, not beside
    it, and the head after the last layer, so the peak stays the largest block."""
    from transformers import AutoModelForCausalLM

    cfg = arch_config("llama_gqa")
    cfg.vocab_size = 4000  # 4000 x 64 floats = 1 MB, against ~150 KB a layer
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    hf = open_hf(str(tmp_path))
    with streamed_model(hf, "float32") as sm:
        sm.module(_ids())
    embed = hf.tensors["model.embed_tokens.weight"].spec.nbytes
    assert embed > 2 * _block_bytes(hf, "model.layers.0.")
    assert sm.most_held == sm.largest_block == embed


@torch.no_grad()
def test_a_read_failing_ahead_is_raised_by_the_forward_and_leaves_no_thread(arch_models):
    """The read-ahead thread's error reaches the caller as the read's own error (a file cut short after it
    was opened), on the caller's thread, and the reading thread is gone."""
    hf = open_hf(str(arch_models["llama_gqa"]))
    key = "model.layers.2.mlp.up_proj.weight"  # read ahead while layer 1 computes
    hf.tensors[key] = replace(hf.tensors[key], offset=hf.tensors[key].file.stat().st_size)
    with pytest.raises(CheckpointFormatError, match=f"ends inside tensor {key}"):
        reference_losses(hf, _ids(), "float32")
    assert not [t for t in threading.enumerate() if t.name.startswith("flame-ext-read-ahead")]


@torch.no_grad()
@pytest.mark.parametrize("key", ["model.norm.weight", "model.layers.2.mlp.up_proj.weight"])
def test_a_key_missing_from_the_files_falls_back_to_the_whole_model_and_says_so(arch_models, tmp_path, key):
    src = arch_models["llama_gqa"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors[key]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(0)
    losses, _, notes = reference_losses(open_hf(str(broken)), _ids(), "float32")
    assert len(notes) == 1 and "whole model" in notes[0] and key in notes[0], notes
    assert torch.isfinite(losses).all()
    assert json.dumps(notes)  # goes into the manifest as is


@pytest.mark.parametrize("device", ["cuda", "tpu"])
def test_an_unusable_reference_device_is_refused_before_anything_is_written(tiny_model, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: cuda is a usable device here")
    out = tmp_path / "step-0"
    r = run_cli("convert", "--model", str(tiny_model), "--checkpoint", str(out), "--reference-device", device)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reference-device" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_records_where_the_reference_ran(tiny_model, tmp_path):
    out = tmp_path / "ref.json"
    r = run_cli("reference", "--model", str(tiny_model), "--out", str(out), "--reference-device", "cpu")
    assert r.returncode == 0, r.stderr
    ref = json.loads(out.read_text())["reference"]
    assert ref["device"] == "cpu" and ref["notes"] == []
    assert abs(ref["loss_mean"] - 3.5601) < 1e-3  # the embedded model's known reference loss (mixed text)
