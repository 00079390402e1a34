"""``flame_ext.json``: what a converted checkpoint says about itself, checked against the checkpoint's own
DCP metadata, the HF source files, and an HF forward pass computed here independently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import flame_ext
from flame_ext.errors import CheckpointFormatError, InputError
from flame_ext.io.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest, read_reference, write_manifest
from flame_ext.io.registry import transformers_major
from flame_ext.model.reference_loss import DEFAULT_REFERENCE_TEXT


@pytest.fixture(scope="module")
def manifest(tiny_dcp) -> dict:
    return json.loads((tiny_dcp / MANIFEST_NAME).read_text())


def test_manifest_names_its_source(manifest, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["tool_version"] == flame_ext.__version__
    assert manifest["source"]["model"] == str(tiny_model)
    assert Path(manifest["source"]["path"]) == tiny_model.resolve()
    assert manifest["source"]["model_type"] == config["model_type"]
    assert (
        manifest["source"]["config_sha256"] == hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    )
    assert manifest["layout"] == "flat" and manifest["fresh_keys"] == []


def test_manifest_tensor_table_matches_the_dcp_metadata(manifest, tiny_dcp, tiny_model):
    from transformers import AutoModelForCausalLM

    md = dcp.FileSystemReader(str(tiny_dcp)).read_metadata().state_dict_metadata
    tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
    assert sorted(manifest["tensors"]) == sorted(tensors)
    for key, entry in manifest["tensors"].items():
        assert tuple(entry["shape"]) == tuple(tensors[key].size), key
        assert entry["dtype"] == str(tensors[key].properties.dtype).removeprefix("torch."), key
        assert entry["numel"] == tensors[key].size.numel(), key
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert manifest["total_parameters"] == hf_model.num_parameters()


def test_manifest_reference_equals_an_independent_hf_forward(manifest, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = manifest["reference"]
    ids = torch.tensor(ref["token_ids"])
    # The batch: consecutive 512-token rows of the bundled reference text, as the model's tokenizer cuts it.
    tokens = AutoTokenizer.from_pretrained(tiny_model)(DEFAULT_REFERENCE_TEXT.read_text(), add_special_tokens=False)[
        "input_ids"
    ]
    rows = min(2, len(tokens) // 512)
    assert rows >= 1 and ids.shape == (rows, 512) and ref["seq_len"] == 512
    assert ids.flatten().tolist() == tokens[: rows * 512]

    dtype = getattr(torch, ref["dtype"])
    dtype_arg = "dtype" if transformers_major() >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, **{dtype_arg: dtype}).eval()
    assert ref["dtype"] == str(next(model.parameters()).dtype).removeprefix("torch.")
    assert ref["attn_implementation"] == model.config._attn_implementation
    with torch.no_grad():
        out = model(ids, labels=ids)
    per_token = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    assert torch.tensor(ref["loss_per_token"]).shape == (rows, 511)
    assert ref["loss_mean"] == pytest.approx(out.loss.item(), abs=1e-5)
    torch.testing.assert_close(
        torch.tensor(ref["loss_per_token"]), per_token, atol=1e-4, rtol=1e-4
    )  # 6-decimal rounding + kernel order
    assert ref["loss_mean"] < 4.0, "the embedded model is trained: its loss is far below ln(256) = 5.55"


# ---------------------------------------------------------------- reading manifests back


def test_read_manifest_checks_version_and_fields(manifest, tmp_path):
    good = write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest == read_manifest(good)
    assert read_reference(tmp_path) == manifest["reference"]

    write_manifest(tmp_path, {**manifest, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(CheckpointFormatError, match="format version"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, {k: v for k, v in manifest.items() if k != "tensors"})
    with pytest.raises(CheckpointFormatError, match='lacks the field "tensors"'):
        read_manifest(tmp_path)
    write_manifest(tmp_path, {**manifest, "reference": None})
    with pytest.raises(InputError, match="--no-reference"):
        read_reference(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not JSON"):
        read_manifest(tmp_path)
    with pytest.raises(InputError, match="no such manifest"):
        read_manifest(tmp_path / "elsewhere")
