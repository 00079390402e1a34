"""The HF reference forward pass, one block of weights in memory at a time.

The model class is built on ``meta`` and transformers' own ``forward`` runs it, so masks, the rotary
embedding, norms and the head are computed by the model's code. Only the lifetime of the weights changes:
before a block runs (the input embedding, each decoder layer, the output head) its tensors are read from
the HF files and cast to the run dtype; after it ran they are dropped back to ``meta``. Everything outside
the blocks (final norm, rotary embedding) is small and stays loaded.

While a block computes, one thread reads the next block's weights, so the disk and the arithmetic overlap
(on a 7B read cold they take about the same time). The next block is read ahead only when the two fit in
twice the largest decoder layer: layer after layer, never an embedding the size of several layers beside
one. Peak memory is the largest block, or two layers, plus the activations, whatever the number of layers.

A model whose structure cannot be walked this way (no decoder-layer list, a weight used outside its
block, a buffer that cannot be rebuilt, a key missing from the files) raises ``NotStreamable``; the caller
then loads the whole model instead and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from flame_ext.io.dcp import row_blocks
from flame_ext.io.hf import (
    HFCheckpoint,
    HFTensor,
    build_meta_model,
    hf_model,
    hf_source,
    read_tensor,
    tied_aliases,
)
from flame_ext.model.buffer_rebuild import fresh_buffers

__all__ = ["NotStreamable", "StreamedModel", "build_streamed", "streamed_model", "whole_model_bytes"]

_READ_BYTES = 64 * 1024 * 1024  # rows read at once when a tensor is cast: bounds the transient copy


def _release_freed_memory() -> None:
    """Hand memory freed by the block back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A layer's activations are tens of MB each: once glibc has seen blocks of that size freed, it serves
    them from its heap instead of fresh mappings, and the freed heap is not returned on its own. Measured
    on OLMo-2-7B shapes: the resident size grew by about 40 MB a layer without this, 1.3 GB over 32 layers.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


class NotStreamable(Exception):
    """This model cannot be run block by block; ``str(exc)`` says why."""


def whole_model_bytes(hf: HFCheckpoint, dtype: str) -> int:
    """Memory the whole model takes at ``dtype``: what a fallback to ``from_pretrained`` costs."""
    itemsize = getattr(torch, dtype).itemsize
    return sum(t.spec.numel * itemsize for t in hf.tensors.values())


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise NotStreamable(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Modules whose weights are loaded only while they run, in the order the forward reaches them."""
    hf = hf_model(model)
    blocks = [hf.get_input_embeddings(), *_decoder_layers(model), hf.get_output_embeddings()]
    return [b for b in blocks if b is not None]


class StreamedModel:
    """An HF causal LM on ``meta`` whose weights come from the files block by block while it runs.

    Use ``with streamed_model(...) as sm: sm.module(token_ids)``; the forward hooks are removed on exit.
    """

    def __init__(self, hf: HFCheckpoint, model: nn.Module, dtype: str, device: torch.device) -> None:
        self.hf = hf
        self.dtype = getattr(torch, dtype)
        self.device = device
        self.module = model
        self.names = {m: name for name, m in model.named_modules()}
        self.tied = tied_aliases(model)
        self.base_prefix = getattr(model, "base_model_prefix", "model") + "."
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.bytes_read = 0
        self.largest_block = 0
        self.most_held = 0  # bytes of block weights held at once, a block read ahead included
        self._next: dict[nn.Module, nn.Module] = {}
        self._sizes: dict[nn.Module, int] = {}  # each block's weight bytes, from the file headers
        self._ahead_limit = 0
        self._ahead: tuple[nn.Module, Future] | None = None
        self._reader: ThreadPoolExecutor | None = None
        # Called before each block is read; a caller running the forward beside other work raises from it
        # to stop the forward between blocks.
        self.before_block: Callable[[], None] | None = None

    def _source(self, key: str) -> HFTensor:
        src = hf_source(key, self.hf, self.tied, self.base_prefix)
        if src is None:
            raise NotStreamable(f"{key} is not in the HF files")
        return src

    def _read_as(self, src: HFTensor, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor at ``dtype`` on the run device; a cast goes through blocks of rows, never a
        whole second copy."""
        self.bytes_read += src.spec.nbytes
        if getattr(torch, src.spec.dtype) == dtype or not src.spec.shape:
            return read_tensor(src).to(self.device, dtype)
        out = torch.empty(src.spec.shape, dtype=dtype, device=self.device)
        for start, end in row_blocks(src.spec, _READ_BYTES):
            out[start:end] = read_tensor(src, (start, end))
        return out

    def _dtype_for(self, key: str, meta: torch.Tensor) -> torch.dtype:
        """What ``from_pretrained(dtype=...)`` gives a parameter: the run dtype for floating ones, except in
        the modules the class keeps in float32."""
        if not meta.dtype.is_floating_point:
            return meta.dtype
        if self.keep_fp32 and any(part in key.split(".") for part in self.keep_fp32):
            return torch.float32
        return self.dtype

    def _named(self, module: nn.Module, recurse: bool) -> Iterator[tuple[str, nn.Module]]:
        """``module`` (and its children when ``recurse``) with the key prefix of each."""
        for sub_name, sub in module.named_modules() if recurse else [("", module)]:
            prefix = ".".join(p for p in (self.names[module], sub_name) if p)
            yield (prefix + "." if prefix else ""), sub

    def _stored(self, module: nn.Module, recurse: bool) -> Iterator[tuple[str, torch.dtype]]:
        """Key and run dtype of every tensor of ``module`` that comes from the files: its parameters (at the
        dtype ``from_pretrained`` gives them) and persistent buffers."""
        for prefix, sub in self._named(module, recurse):
            for name, p in sub._parameters.items():
                if p is not None:
                    yield prefix + name, self._dtype_for(prefix + name, p)
            for name, b in sub._buffers.items():
                if b is not None and name not in sub._non_persistent_buffers_set:
                    yield prefix + name, b.dtype

    def _weights(self, module: nn.Module, recurse: bool) -> dict[str, torch.Tensor]:
        """The stored tensors of ``module`` read from the files, by key. Changes no module, so it may run
        on the read-ahead thread."""
        return {key: self._read_as(self._source(key), dtype) for key, dtype in self._stored(module, recurse)}

    def _weight_bytes(self, module: nn.Module) -> int:
        """What ``_weights(module, recurse=True)`` will hold, from the file headers (nothing read)."""
        return sum(self._source(key).spec.numel * dtype.itemsize for key, dtype in self._stored(module, True))

    def fill(self, module: nn.Module, *, recurse: bool, weights: dict[str, torch.Tensor] | None = None) -> int:
        """Give ``module`` (and its children when ``recurse``) real tensors: ``weights`` (read from the files
        when not given), non-persistent buffers rebuilt as its constructor builds them. Returns the bytes now
        held."""
        if weights is None:
            weights = self._weights(module, recurse)
        held = 0
        for prefix, sub in self._named(module, recurse):
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    value = weights[prefix + name]
                    sub._parameters[name] = nn.Parameter(value, requires_grad=False)
                    held += value.nbytes
            held += self._fill_buffers(sub, prefix, weights)
        return held

    def _fill_buffers(self, module: nn.Module, prefix: str, weights: dict[str, torch.Tensor]) -> int:
        present = [n for n, b in module._buffers.items() if b is not None]
        if not present:
            return 0
        rebuilt = None
        if any(n in module._non_persistent_buffers_set for n in present):
            rebuilt = fresh_buffers(module)
            if rebuilt is None:
                raise NotStreamable(
                    f"the non-persistent buffers of {prefix or type(module).__name__} cannot be rebuilt"
                )
        held = 0
        for name in present:
            if name in module._non_persistent_buffers_set:
                value = rebuilt[name].to(self.device)  # type: ignore[index]
            else:
                value = weights[prefix + name]
            module._buffers[name] = value
            held += value.nbytes
        return held

    def block_count(self) -> int:
        """How many blocks the forward loads one after the other (0 when the structure cannot be walked)."""
        try:
            return len(_blocks(self.module))
        except NotStreamable:
            return 0

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        blocks = _blocks(self.module)
        inside = {m for b in blocks for m in b.modules()}
        for module in self.module.modules():
            if module not in inside:
                self.fill(module, recurse=False)
        self._next = dict(zip(blocks, blocks[1:]))
        self._sizes = {block: self._weight_bytes(block) for block in blocks}
        self._ahead_limit = 2 * max(self._sizes[layer] for layer in _decoder_layers(self.module))
        handles = []
        for block in blocks:
            handles.append(block.register_forward_pre_hook(self._load_block))
            handles.append(block.register_forward_hook(self._drop_block))
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="flame-ext-read-ahead")
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._discard_read_ahead()
            self._reader.shutdown(wait=True)
            self._reader = None

    def _load_block(self, block: nn.Module, args: Any) -> None:
        if self.before_block is not None:
            self.before_block()
        weights = self._take_read_ahead(block)
        if weights is None:
            weights = self._weights(block, recurse=True)
        current = self._sizes[block]
        ahead = self._read_ahead(self._next.get(block), current)
        self.most_held = max(self.most_held, current + ahead)
        self.largest_block = max(self.largest_block, self.fill(block, recurse=True, weights=weights))

    def _read_ahead(self, block: nn.Module | None, current: int) -> int:
        """Start reading ``block`` while the current one computes, if both fit the limit; the bytes it will hold."""
        if block is None or self._reader is None:
            return 0
        size = self._sizes[block]
        if current + size > self._ahead_limit:
            return 0
        self._ahead = (block, self._reader.submit(self._weights, block, True))
        return size

    def _take_read_ahead(self, block: nn.Module) -> dict[str, torch.Tensor] | None:
        """The weights read ahead for ``block`` (its read's error raised here, on the forward's thread)."""
        if self._ahead is None or self._ahead[0] is not block:
            self._discard_read_ahead()
            return None
        future = self._ahead[1]
        self._ahead = None
        return future.result()

    def _discard_read_ahead(self) -> None:
        """Wait for a read ahead nobody will use and drop it, errors included (the forward ended or went on
        to another block)."""
        if self._ahead is not None:
            future = self._ahead[1]
            self._ahead = None
            if not future.cancel():
                future.exception()

    def _drop_block(self, block: nn.Module, args: Any, output: Any) -> None:
        block.to_empty(device="meta")
        _release_freed_memory()


def build_streamed(
    hf: HFCheckpoint, dtype: str, *, trust_remote_code: bool = False, device: torch.device | str = "cpu"
) -> StreamedModel:
    """The model on ``meta`` at ``dtype`` (as ``from_pretrained(dtype=...)`` builds it), not yet hooked.

    Building changes torch's process-wide default dtype for its duration, so it belongs on the thread that
    owns the process, before any other thread creates tensors; ``hooked()`` and the forward may then run on
    any thread.
    """
    model = build_meta_model(hf, trust_remote_code=trust_remote_code, dtype=dtype)
    return StreamedModel(hf, model.eval(), dtype, torch.device(device))


@contextlib.contextmanager
def streamed_model(
    hf: HFCheckpoint, dtype: str, *, trust_remote_code: bool = False, device: torch.device | str = "cpu"
) -> Iterator[StreamedModel]:
    """The model built by ``build_streamed`` and hooked to stream.

    Raises ``NotStreamable`` before anything is read when the structure cannot be walked; a failure while
    running (a weight used outside its block reaches a ``meta`` tensor) surfaces as the forward's own
    error, which the caller turns into the fallback.
    """
    streamed = build_streamed(hf, dtype, trust_remote_code=trust_remote_code, device=device)
    with streamed.hooked():
        yield streamed
