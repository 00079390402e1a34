"""The torchrun agreement on content, in one process: file identities, block digests, the re-check and its line.
(The real two-rank runs are in ``test_distributed_convert.py``.)"""

from __future__ import annotations

import shutil

import torch

from flame_ext.convert.hf_to_dcp import ConvertOptions, prepare_conversion
from flame_ext.convert.same_source import (
    BlockDigests,
    differing_keys,
    file_identities,
    mixed_sources_message,
    same_files,
)


def _plan(model):
    return prepare_conversion(ConvertOptions(model=str(model), checkpoint="unused", reference=False, progress=False))


def _digest_all(entries, rows: int = 7) -> BlockDigests:
    blocks = BlockDigests()
    for e in entries:
        n = e.spec.shape[0] if e.spec.shape else 0
        if not n:
            blocks.add(e.key, 0, e.read_rows(0, 1))
        for a in range(0, n, rows):
            blocks.add(e.key, a, e.read_rows(a, min(a + rows, n)))
    return blocks


def test_the_same_folder_is_the_same_files_and_a_copy_is_not(sharded_model, tmp_path):
    copy = shutil.copytree(sharded_model, tmp_path / "copy")
    ours = file_identities(_plan(sharded_model).entries)
    assert same_files(file_identities(_plan(sharded_model).entries), ours)
    assert not same_files(file_identities(_plan(copy).entries), ours)  # other inodes: must be proved by content


def test_a_copy_converts_to_the_same_blocks_and_other_weights_are_named_by_key(sharded_model, tmp_path):
    from safetensors.torch import load_file, save_file

    ours = _plan(sharded_model).entries
    copy = shutil.copytree(sharded_model, tmp_path / "copy")
    assert differing_keys(ours, _digest_all(_plan(copy).entries).blocks) == []
    shard = sorted(copy.glob("*.safetensors"))[1]
    tensors = load_file(shard)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[-1] = torch.nextafter(tensors[key].view(-1)[-1], torch.tensor(float("inf")))  # one ulp
    save_file(tensors, shard, metadata={"format": "pt"})
    assert differing_keys(ours, _digest_all(_plan(copy).entries).blocks) == [key]


def test_the_refusal_is_one_line_naming_both_sides():
    keys = [f"k{i}" for i in range(7)]
    files = {
        0: {k: f"/n0/m/model-0000{i}.safetensors" for i, k in enumerate(keys)},
        1: {k: f"/n1/m/model-0000{i}.safetensors" for i, k in enumerate(keys)},
    }
    line = mixed_sources_message({1: keys}, files, "/ckpt/step-0")
    assert "\n" not in line
    assert "rank 1's model-00000.safetensors, model-00001.safetensors" in line
    assert "and 3 more (in /n1/m) differ from rank 0's (in /n0/m), 7 tensors" in line
    assert line.endswith("nothing was published at /ckpt/step-0")
    renamed = {0: {"k0": "/a/x.safetensors"}, 1: {"k0": "/b/y.safetensors"}}
    assert "rank 1's /b/y.safetensors differs from rank 0's /a/x.safetensors, 1 tensor" in mixed_sources_message(
        {1: ["k0"]}, renamed, "/d"
    )
