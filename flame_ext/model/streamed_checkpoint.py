"""A DCP checkpoint's forward pass, one block of weights in memory at a time, loaded as a trainer loads it.

``diagnose --loss`` judges the checkpoint the guard would judge: the model class built on ``meta`` at the
run dtype, its tensors given uninitialised memory (what ``to_empty()`` gives: the dtype the class built them
at), filled by ``torch.distributed.checkpoint`` (strict; DCP casts a bf16 checkpoint into float32 tensors as
it does for a trainer), and the non-persistent buffers no checkpoint holds set from the config, as the
guard's repair sets them. Only the lifetime of the weights differs from the whole-model load: each block
(the input embedding, each decoder layer, the output head) is loaded just before it runs and dropped back
to ``meta`` after, with the next block read ahead while one computes, as ``StreamedModel`` does with the HF
files. Peak memory is the largest block, or two layers, plus the activations, whatever the number of layers.

A model that cannot be walked this way (see ``StreamedModel``), or whose non-persistent buffers cannot be
rebuilt from its config, raises ``NotStreamable``: the caller loads the whole model instead and says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flame_ext.io.dcp import DCPRowReader
from flame_ext.io.hf import HFCheckpoint, build_meta_model
from flame_ext.io.specs import TensorSpec
from flame_ext.model.buffer_rebuild import fresh_buffers
from flame_ext.model.streamed import NotStreamable, StreamedModel

__all__ = ["CheckpointStreamedModel", "unloadable_keys"]


def unloadable_keys(
    model: nn.Module, found: dict[str, TensorSpec | None], key_map: dict[str, str], tied: dict[str, str]
) -> list[str]:
    """Model keys a strict load of the checkpoint cannot fill (absent, or another shape): a trainer's load
    fails on them. A tied alias (``lm_head.weight``) may be filled from its twin's key."""
    out = []
    for key, tensor in model.state_dict().items():
        spec = _checkpoint_spec(key, found, key_map, tied)[1]
        if spec is None or tuple(spec.shape) != tuple(tensor.shape):
            out.append(key)
    return out


def _checkpoint_spec(
    key: str, found: dict[str, TensorSpec | None], key_map: dict[str, str], tied: dict[str, str]
) -> tuple[str | None, TensorSpec | None]:
    """The checkpoint key holding model key ``key`` and its spec: its own, else its tied twin's."""
    twins = [tied[key]] if key in tied else [k for k, v in tied.items() if v == key]
    for candidate in (key, *twins):
        ckpt_key = key_map.get(candidate)
        if ckpt_key is not None and found.get(ckpt_key) is not None:
            return ckpt_key, found[ckpt_key]
    return None, None


class CheckpointStreamedModel(StreamedModel):
    """The model on ``meta`` whose weights come from a DCP checkpoint block by block while it runs.

    Built by ``build``; run as ``StreamedModel`` is (``with sm.hooked(): sm.module(token_ids)``).
    ``buffers_set`` names the non-persistent buffers set from the config, for the report.
    """

    def __init__(
        self,
        hf: HFCheckpoint,
        model: nn.Module,
        dtype: str,
        device: torch.device,
        folder: str | Path,
        found: dict[str, TensorSpec | None],
        key_map: dict[str, str],
    ) -> None:
        super().__init__(hf, model, dtype, device)
        self.reader = DCPRowReader(folder)
        self.found = found
        self.key_map = key_map
        # The tensors to_empty() gives the model and the load fills: the shape and dtype of each on meta.
        self.meta_specs = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict(keep_vars=True).items()}
        self.buffers_set: list[str] = []

    @classmethod
    def build(
        cls,
        hf: HFCheckpoint,
        dtype: str,
        folder: str | Path,
        found: dict[str, TensorSpec | None],
        key_map: dict[str, str],
        *,
        trust_remote_code: bool = False,
        device: torch.device | str = "cpu",
    ) -> "CheckpointStreamedModel":
        """The model class on ``meta`` at ``dtype`` (parameters at ``dtype``, buffers at what the class gives
        them), as the trainer builds it; nothing read. On the thread that owns the process (see
        ``build_meta_model``)."""
        model = build_meta_model(hf, trust_remote_code=trust_remote_code, dtype=dtype)
        return cls(hf, model.eval(), dtype, torch.device(device), folder, found, key_map)

    def _dtype_for(self, key: str, meta: torch.Tensor) -> torch.dtype:
        """The dtype ``to_empty()`` keeps: the one the model was built with (no ``from_pretrained`` rules)."""
        return meta.dtype

    def _checkpoint_key(self, key: str) -> tuple[str, TensorSpec]:
        ckpt_key, spec = _checkpoint_spec(key, self.found, self.key_map, self.tied)
        if ckpt_key is None or spec is None:
            raise NotStreamable(f"{key} is not in the checkpoint")
        return ckpt_key, spec

    def _weights(self, module: nn.Module, recurse: bool) -> dict[str, torch.Tensor]:
        """Fresh tensors of the shapes and dtypes on ``meta`` for every stored tensor of ``module``, filled by
        one strict ``dcp.load``. Changes no module, so it may run on the read-ahead thread."""
        out: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        for key, dtype in self._stored(module, recurse):
            ckpt_key, spec = self._checkpoint_key(key)
            if ckpt_key in state:  # two keys of one block held by one checkpoint tensor: read once
                out[key] = state[ckpt_key]
                continue
            out[key] = state[ckpt_key] = torch.empty(self.meta_specs[key][0], dtype=dtype, device=self.device)
            self.bytes_read += spec.nbytes
        if state:
            self.reader.load(state)
        return out

    def _weight_bytes(self, module: nn.Module) -> int:
        return sum(
            torch.Size(self.meta_specs[key][0]).numel() * dtype.itemsize for key, dtype in self._stored(module, True)
        )

    def _fill_buffers(self, module: nn.Module, prefix: str, weights: dict[str, torch.Tensor]) -> int:
        """Persistent buffers from the checkpoint; non-persistent ones set from the config at the dtype the
        class gave them, as the guard's repair copies them into the buffers ``to_empty()`` left."""
        present = [n for n, b in module._buffers.items() if b is not None]
        rebuilt = None
        if any(n in module._non_persistent_buffers_set for n in present):
            rebuilt = fresh_buffers(module)
            missing = [n for n in present if n in module._non_persistent_buffers_set and n not in (rebuilt or {})]
            if missing:
                raise NotStreamable(
                    f"the non-persistent buffer {prefix}{missing[0]} has no config-derived value to set it to"
                )
        held = 0
        for name in present:
            if name in module._non_persistent_buffers_set:
                value = rebuilt[name].to(self.device, module.get_buffer(name).dtype)  # type: ignore[index]
                if prefix + name not in self.buffers_set:
                    self.buffers_set.append(prefix + name)
            else:
                value = weights[prefix + name]
            module._buffers[name] = value
            held += value.nbytes
        return held
