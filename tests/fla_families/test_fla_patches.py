"""The patched flame converter against stock flame's, for every fla family that builds on the CPU.

After `flame-ext patch apply`, flame's ``flame/utils/convert_hf_to_dcp.py`` runs ``flame_ext.convert_hf_to_dcp``
with its own arguments. Stock flame's converter (e11e7be) is ``import fla``, ``AutoModelForCausalLM.from_pretrained``,
``model.state_dict()`` and ``DCP.save({"model": state_dict})``: ``stock_flame_conversion`` below does exactly that,
so this runs without a flame checkout (tests/flame/test_flame_src_fla.py runs flame's real file when FLAME_SRC is set).
The two must hold the same tensors, bit for bit, the patched one under flat keys instead of ``model.``-nested ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import dcp_tensors
from fla_models import FAMILIES

from flame_ext.convert_hf_to_dcp import main as patched_flame_main


@torch.inference_mode()
def stock_flame_conversion(model: Path, checkpoint: Path) -> None:
    """What stock flame's ``convert_hf_weights`` does (flame/utils/convert_hf_to_dcp.py at e11e7be)."""
    import fla  # noqa: F401  (flame's registration of its models)
    import torch.distributed.checkpoint as DCP
    from transformers import AutoModelForCausalLM

    state_dict = AutoModelForCausalLM.from_pretrained(model).state_dict()
    checkpoint.mkdir(parents=True, exist_ok=True)
    DCP.save({"model": state_dict}, storage_writer=DCP.filesystem.FileSystemWriter(checkpoint, thread_count=8))


def assert_same_tensors_flat_for_nested(patched: dict[str, torch.Tensor], stock: dict[str, torch.Tensor]) -> None:
    assert stock and all(k.startswith("model.") for k in stock)  # {"model": state_dict} nests every key
    assert sorted(patched) == sorted(k.removeprefix("model.") for k in stock)
    for key, value in stock.items():
        mine = patched[key.removeprefix("model.")]
        assert mine.dtype == value.dtype and mine.shape == value.shape, key
        assert torch.equal(mine.view(torch.uint8), value.view(torch.uint8)), f"{key}: bytes differ"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_patched_flame_converter_writes_stock_flames_tensors_flat(name, fla_hf, tmp_path):
    stock, patched = tmp_path / "stock", tmp_path / "patched"
    stock_flame_conversion(fla_hf(name), stock)
    assert patched_flame_main(["--model", str(fla_hf(name)), "--checkpoint", str(patched)]) == 0
    assert_same_tensors_flat_for_nested(dcp_tensors(patched), dcp_tensors(stock))
