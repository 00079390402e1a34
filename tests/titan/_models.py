"""Models built the way trainers build them, and checkpoints broken the ways real ones break."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from flame_ext.checks.nonpersistent_buffers import fresh_buffers, nonpersistent_buffer_modules
from flame_ext.io.dcp import read_dcp_metadata

# Keys the "broken keys" checkpoint loses, gains and reshapes (the embedded OLMo2 has 2 layers).
DROPPED = ("model.layers.1.mlp.down_proj.weight", "model.norm.weight")
ADDED = "model.layers.2.self_attn.q_proj.weight"
RESHAPED = "model.layers.0.post_attention_layernorm.weight"


def hf_like_trainer(hf_dir: Path) -> nn.Module:
    """flame's way: ``from_config`` on meta, ``to_empty``, ``post_init()``, train mode. Weights come from the load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.post_init()
    return model.train()


def rope_is_right(model: nn.Module) -> bool:
    for _, module, names in nonpersistent_buffer_modules(model):
        fresh = fresh_buffers(module)
        if fresh is None or any(not torch.allclose(module._buffers[b].float(), fresh[b].float()) for b in names):
            return False
    return True


def _rope_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [module._buffers[b] for _, module, names in nonpersistent_buffer_modules(model) for b in names]


def _plausible_garbage(buf: torch.Tensor) -> bool:
    """Finite and small enough that the forward pass stays finite (1e30 is finite, its cos/sin products are not)."""
    return bool(torch.isfinite(buf).all()) and float(buf.abs().max()) < 1e3


def leave_rope_uninitialised(model: nn.Module) -> bool:
    """The RoPE buffers as meta + to_empty leaves them: uninitialised memory.

    With transformers 4.57 ``post_init`` leaves them so by itself (returns True); with 5.x it recomputes them,
    so they are overwritten here with arbitrary values, as to_empty's memory would hold (returns False).
    Memory reuse can make 4.57's garbage come out right by chance, or hold inf/NaN (every position's loss is then
    non-finite: another failure, with its own test), or values so large the loss overflows; then it is overwritten too.
    """
    if not rope_is_right(model) and all(_plausible_garbage(buf) for buf in _rope_buffers(model)):
        return True
    gen = torch.Generator().manual_seed(7)
    for _, module, names in nonpersistent_buffer_modules(model):
        for b in names:
            buf = module._buffers[b]
            buf.copy_(torch.rand(buf.shape, generator=gen, dtype=torch.float32).to(buf.dtype) * 50)
    return False


def dcp_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) DCP checkpoint, read with DCP itself."""
    specs = {k: s for k, s in read_dcp_metadata(folder).items() if s is not None}
    sd = {k: torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for k, s in specs.items()}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def rewrite_dcp(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    """A copy of ``src`` with its tensors edited, written by DCP, keeping ``src``'s manifest."""
    sd = edit(dcp_tensors(src))
    dcp.save(sd, checkpoint_id=str(dst), no_dist=True)
    for extra in src.glob("*.json"):
        shutil.copy2(extra, dst / extra.name)
    return dst


def swap_layers(sd: dict[str, torch.Tensor], a: int = 0, b: int = 1) -> dict[str, torch.Tensor]:
    """Right shapes, wrong tensors: every tensor of layer ``a`` exchanged with layer ``b``."""
    out = dict(sd)
    for key in sd:
        if f".layers.{a}." in key:
            other = key.replace(f".layers.{a}.", f".layers.{b}.")
            out[key], out[other] = sd[other], sd[key]
    return out


def blank_data_files(folder: Path) -> None:
    """Zero every data file at its size, keeping ``.metadata``: the metadata stays valid (every byte range it
    names exists), but any attempt to read a tensor now fails."""
    for f in folder.glob("*.distcp"):
        f.write_bytes(bytes(f.stat().st_size))
