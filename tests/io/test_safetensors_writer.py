"""The streaming safetensors writer: files safetensors itself reads back exactly, written one block of rows
at a time (each tensor read only when it is written), and the shard plan that groups tensors into files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flame_ext.io.hf import read_safetensors_header
from flame_ext.io.safetensors_writer import shard_plan, write_safetensors
from flame_ext.io.specs import TensorSpec, dtype_name


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 9, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(11, generator=g).to(torch.float16),
        "d.ids": torch.arange(13, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.bytes": torch.arange(5, dtype=torch.uint8),
    }


def test_written_file_reads_back_exactly_with_safetensors(tmp_path):
    tensors = _tensors()
    specs = {k: TensorSpec(tuple(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()}
    order: list[str] = []

    def read(key: str):
        order.append(key)
        t = tensors[key]
        return [t] if t.dim() == 0 else list(t.split(2))  # blocks of 2 rows, as a checkpoint is read

    written: list[int] = []
    file = tmp_path / "model.safetensors"
    write_safetensors(file, specs, read, on_written=written.append)
    assert order == list(specs), "each tensor is read once, in order, when it is written"
    assert sum(written) == sum(s.nbytes for s in specs.values())

    back = load_file(str(file))
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers checks before loading
    header = read_safetensors_header(file)  # our own reader accepts it too (offsets, sizes, no truncation)
    assert sorted(header) == sorted(tensors)
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    assert header_len % 8 == 0, "the data section starts 8-byte aligned"


def test_a_reader_returning_the_wrong_tensor_is_an_error(tmp_path):
    specs = {"a": TensorSpec((2, 3), "float32")}
    with pytest.raises(ValueError, match="planned"):
        write_safetensors(tmp_path / "x.safetensors", specs, lambda k: [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="planned"):
        write_safetensors(tmp_path / "y.safetensors", specs, lambda k: [torch.zeros(2, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="got 3 rows"):  # blocks that do not add up to the tensor
        write_safetensors(tmp_path / "z.safetensors", specs, lambda k: [torch.zeros(2, 3), torch.zeros(1, 3)])


def test_shard_plan_keeps_order_and_limits_size():
    specs = {f"t{i}": TensorSpec((n,), "float32") for i, n in enumerate([10, 20, 5, 100, 1, 1, 30])}
    limit = 120  # bytes: 30 float32 elements
    shards = shard_plan(specs, limit)
    assert [k for shard in shards for k in shard] == list(specs)
    for shard in shards:
        size = sum(specs[k].nbytes for k in shard)
        assert size <= limit or len(shard) == 1, shard  # only a single over-size tensor may exceed it
    assert ["t3"] in shards
    assert shard_plan(specs, 10**9) == [list(specs)]
