"""HF -> torchtitan's native keys, a layer at a time, through the model's own state-dict adapter.

torchtitan's ``from_hf`` takes a whole state dict: it renames, permutes (llama3's q/k rotary layout) and stacks
(MoE experts into one ``[E, ...]`` tensor per layer). Applied to the whole model it needs the whole model in
memory. Here it is applied to one group of HF tensors at a time:

- HF keys are grouped by their layer index (``model.layers.<i>.``, an MoE layer's experts included); every other
  key (embeddings, final norm, head) is a group of its own;
- the plan comes from ``meta`` tensors built from the safetensors headers: ``from_hf`` on each group's meta
  tensors gives the native keys, shapes and dtypes that group yields, checked against the whole-model mapping
  and against what the model's ``state_dict()`` asks for, before a byte is written;
- when writing, a group's HF tensors are read (mapped from the files), ``from_hf`` is applied to them, and
  its outputs are handed to the streaming writer row block by row block, then dropped;
- an output the adapter makes by stacking HF tensors along its first dimension (an MoE layer's ``[E, ...]``
  experts) is never built whole: which HF tensors it stacks, in which order, is watched on the adapter's own
  ``from_hf`` call (``native_stacks``), that call gets them as ``meta``, and each row block the writer asks for
  is those rows' HF tensors copied in, one at a time. Memory is then one row block, whatever the number of
  experts.

An adapter that needs a key from elsewhere in every call (``from_hf`` of a tied model copies the embedding to
``lm_head`` and asserts the embedding is there) gets the other non-layer keys as ``meta`` companions: what it
makes of them is meta and dropped, never written. Keys the model asks for that the adapter maps nothing to
are persistent buffers that training owns (an MoE layer's load-balancing ``expert_bias_E``): they are written
with the model's own initial values and recorded as fresh keys; an unmapped parameter is refused.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flame_ext.convert.native_stacks import apply_watching_stacks
from flame_ext.errors import CheckpointFormatError
from flame_ext.io.dcp_save import WriteEntry
from flame_ext.io.hf import HFCheckpoint, map_tensor
from flame_ext.io.specs import TensorSpec, dtype_name
from flame_ext.titan.native import NativeModel, state_specs

__all__ = ["NativePlan", "plan_native", "group_of_hf_key"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_of_hf_key(key: str) -> str:
    """``layer 3`` for ``model.layers.3.mlp.experts.7.up_proj.weight``; the key itself for a non-layer key."""
    m = _LAYER.search(key)
    return f"layer {int(m.group(1))}" if m else key


def _group_order(group: str) -> tuple[int, int, str]:
    return (0, int(group.split()[1]), "") if group.startswith("layer ") else (1, 0, group)


def _meta(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")


@dataclass
class NativePlan:
    """The write entries in native keys, grouped (a distributed run gives each rank whole groups), and what
    the manifest says about them."""

    entries: list[WriteEntry]
    groups: list[list[WriteEntry]]
    fresh: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # native keys that are another key's values (a tied head)


@dataclass(frozen=True)
class _Stacked:
    """A native tensor the adapter stacks from HF tensors along its first dimension: row ``i`` is ``keys[i]``."""

    keys: list[str]
    dtype: torch.dtype  # as written (after any --dtype cast)


class _Groups:
    """Runs ``from_hf`` on one group at a time and serves its outputs' rows to the writer threads.

    A group's outputs are computed on first request and dropped when every row of every output has been
    served: the writer asks for entries in plan order, so at most a group per writer thread is held. Stacked
    outputs (``stacked``: group -> native key -> HF keys) are not computed by that call: their HF tensors are
    given to it as ``meta``, and each row block is copied from the files when asked for.
    """

    def __init__(self, native: NativeModel, hf: HFCheckpoint, members: dict[str, list[str]],
                 companions: dict[str, list[str]], outputs: dict[str, dict[str, TensorSpec]],
                 stacked: dict[str, dict[str, list[str]]]) -> None:  # fmt: skip
        self._native, self._hf = native, hf
        self._members, self._companions, self._outputs, self._stacked = members, companions, outputs, stacked
        self._held: dict[str, dict[str, torch.Tensor | _Stacked]] = {}
        self._left: dict[str, int] = {}
        self._lock = threading.Lock()

    def reader(self, group: str, key: str) -> Callable[[int, int], torch.Tensor]:
        def read_rows(start: int, end: int) -> torch.Tensor:
            with self._lock:
                tensors = self._held.get(group)
                if tensors is None:
                    tensors = self._held[group] = self._convert(group)
                    self._left[group] = sum(max(1, s.shape[0] if s.shape else 1) for s in self._outputs[group].values())
                value = tensors[key]
                scalar = isinstance(value, torch.Tensor) and not value.dim()
                block = value if scalar or isinstance(value, _Stacked) else value[start:end]
                self._left[group] -= 1 if scalar else end - start
                if self._left[group] <= 0:
                    del self._held[group], self._left[group]
            return self._stack_rows(block, start, end) if isinstance(block, _Stacked) else block

        return read_rows

    def _stack_rows(self, stacked: _Stacked, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of ``torch.stack`` of the HF tensors, one HF tensor mapped at a time."""
        first = self._hf.tensors[stacked.keys[start]].spec
        rows = torch.empty((end - start, *first.shape), dtype=getattr(torch, first.dtype))
        for i, hf_key in enumerate(stacked.keys[start:end]):
            rows[i].copy_(map_tensor(self._hf.tensors[hf_key]))
        return rows.to(stacked.dtype)

    def _convert(self, group: str) -> dict[str, torch.Tensor | _Stacked]:
        planned = self._stacked.get(group, {})
        lazy = {k for keys in planned.values() for k in keys}
        hf_sd: dict[str, Any] = {
            k: _meta(self._hf.tensors[k].spec) if k in lazy else map_tensor(self._hf.tensors[k])
            for k in self._members[group]
        }
        hf_sd.update({k: _meta(self._hf.tensors[k].spec) for k in self._companions.get(group, [])})
        out, stacked = apply_watching_stacks(self._native.adapter.from_hf, hf_sd)
        wanted = self._outputs[group]
        got = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and not v.is_meta and k in wanted}
        if set(got) | set(planned) != set(wanted) or any(stacked.get(k) != keys for k, keys in planned.items()):
            raise CheckpointFormatError(
                f"{type(self._native.adapter).__name__}.from_hf on {group} gave {sorted(got)} (stacked: "
                f"{sorted(stacked)}), planned {sorted(wanted)} (stacked: {sorted(planned)})"
            )
        held: dict[str, torch.Tensor | _Stacked] = {
            k: v.to(getattr(torch, wanted[k].dtype)).contiguous() for k, v in got.items()
        }
        held.update({k: _Stacked(keys, getattr(torch, wanted[k].dtype)) for k, keys in planned.items()})
        return held


def _apply_on_meta(native: NativeModel, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    return _apply_on_meta_watching(native, specs)[0]


def _apply_on_meta_watching(
    native: NativeModel, specs: dict[str, TensorSpec]
) -> tuple[dict[str, TensorSpec], dict[str, list[str]]]:
    """``from_hf`` on ``meta`` tensors: the native keys, shapes and dtypes it gives, and the outputs it stacks."""
    out, stacked = apply_watching_stacks(native.adapter.from_hf, {k: _meta(s) for k, s in specs.items()})
    made = {k: TensorSpec(tuple(v.shape), dtype_name(v.dtype)) for k, v in out.items() if isinstance(v, torch.Tensor)}
    return made, {k: keys for k, keys in stacked.items() if k in made}


def _rows_are(out: TensorSpec | None, keys: list[str], hf_specs: dict[str, TensorSpec]) -> bool:
    """Whether ``out`` is the HF tensors ``keys`` of this group, one a row, as stored."""
    specs = [hf_specs.get(k) for k in keys]
    return (
        out is not None
        and all(s == specs[0] for s in specs)
        and specs[0] is not None
        and (out.shape == (len(keys), *specs[0].shape) and out.dtype == specs[0].dtype)
    )


def plan_native(hf: HFCheckpoint, native: NativeModel, *, dtype: str) -> NativePlan:
    """Every native key the model asks for, mapped to the HF group that feeds it; raises once, listing every
    problem, before anything is read."""
    adapter_name = type(native.adapter).__name__
    hf_specs = {k: t.spec for k, t in hf.tensors.items()}
    try:
        whole = _apply_on_meta(native, hf_specs)
    except Exception as exc:  # the adapter's own refusal (a key it does not know, a RoPE kind it does not map)
        raise CheckpointFormatError(
            f"{hf.source}: {adapter_name}.from_hf cannot map these HF weights for torchtitan's {native.module} "
            f"({native.config}): {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from None
    members: dict[str, list[str]] = {}
    for k in hf.tensors:
        members.setdefault(group_of_hf_key(k), []).append(k)
    rest = [k for k in hf.tensors if not _LAYER.search(k)]
    outputs: dict[str, dict[str, TensorSpec]] = {}
    companions: dict[str, list[str]] = {}
    stacked: dict[str, dict[str, list[str]]] = {}
    owner: dict[str, str] = {}
    for group in sorted(members, key=_group_order):
        mine = {k: hf_specs[k] for k in members[group]}
        try:
            made, stacks = _apply_on_meta_watching(native, mine)
        except Exception:
            others = [k for k in rest if k not in mine]
            companions[group] = others
            made_with, stacks = _apply_on_meta_watching(native, {**mine, **{k: hf_specs[k] for k in others}})
            made_alone = _apply_on_meta(native, {k: hf_specs[k] for k in others}) if others else {}
            made = {k: v for k, v in made_with.items() if k not in made_alone}
        stacked[group] = {k: keys for k, keys in stacks.items() if _rows_are(made.get(k), keys, mine)}
        twice = [k for k in made if k in owner]
        if twice:
            raise CheckpointFormatError(
                f"{adapter_name}.from_hf maps {group} and {owner[twice[0]]} both to {twice[0]}: it does not map "
                "layer by layer, so flame-ext cannot stream it"
            )
        owner.update(dict.fromkeys(made, group))
        outputs[group] = made
    streamed = {k: s for made in outputs.values() for k, s in made.items()}
    if set(streamed) != set(whole) or any(streamed[k].shape != whole[k].shape for k in whole):
        differ = sorted(set(streamed) ^ set(whole)) or [k for k in whole if streamed[k].shape != whole[k].shape]
        raise CheckpointFormatError(
            f"{adapter_name}.from_hf gives other keys layer by layer than on the whole model "
            f"({', '.join(differ[:5])}): flame-ext cannot stream it"
        )
    asked = state_specs(native.meta_model())
    problems = [f"{k}: the adapter gives {streamed[k].shape}, the model asks for {s.shape}"
                for k, s in asked.items() if k in streamed and streamed[k].shape != s.shape]  # fmt: skip
    unasked = sorted(set(streamed) - set(asked))
    if unasked:
        problems.append(f"the adapter gives keys the model does not ask for: {', '.join(unasked)}")
    fresh, unmapped = _fresh_buffers(native, [k for k in asked if k not in streamed])
    if unmapped:
        problems.append(
            f"{len(unmapped)} keys the model asks for are mapped from no HF tensor by {adapter_name}: "
            f"{', '.join(unmapped)}"
        )
    if problems:
        raise CheckpointFormatError(
            f"{hf.source}: cannot convert to torchtitan's {native.module} ({native.config}): " + " | ".join(problems)
        )
    groups_reader = _Groups(native, hf, members, companions, outputs, stacked)
    groups: list[list[WriteEntry]] = []
    for group in sorted(members, key=_group_order):
        entries = []
        for key in sorted(outputs[group]):
            spec = outputs[group][key] if dtype == "auto" else _cast(outputs[group][key], dtype)
            outputs[group][key] = spec
            source = hf.tensors[members[group][0]].file
            entries.append(WriteEntry(key, spec, groups_reader.reader(group, key), source))
        if entries:
            groups.append(entries)
    for key, value in fresh.items():
        groups.append([WriteEntry(key, TensorSpec(tuple(value.shape), dtype_name(value.dtype)), _rows_of(value))])
    unused = [group for group in members if not outputs[group]]
    notes = [f"HF tensors of {g} are mapped to no native key by {adapter_name}; not written" for g in unused]
    if fresh:
        notes.append(
            f"{len(fresh)} keys the adapter maps nothing to are written with the model's initial values: "
            f"{', '.join(sorted(fresh))}"
        )
    tied = (
        ["lm_head.weight"] if native.tied() and "lm_head.weight" not in hf.tensors and "lm_head.weight" in asked else []
    )
    return NativePlan([e for g in groups for e in g], groups, fresh, notes, tied)


def _cast(spec: TensorSpec, dtype: str) -> TensorSpec:
    return TensorSpec(spec.shape, dtype) if getattr(torch, spec.dtype).is_floating_point else spec


def _rows_of(value: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda start, end: value[start:end] if value.dim() else value


def _fresh_buffers(native: NativeModel, keys: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's own initial values of the persistent buffers in ``keys`` (computed by the owning module's
    ``_init_self_buffers`` alone, on the CPU: no parameter is materialised); the keys that are not such
    buffers are returned as unmapped."""
    if not keys:
        return {}, []
    model = native.meta_model()
    params = dict(model.named_parameters())
    fresh: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key in keys:
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path) if path else model
        init = getattr(module, "_init_self_buffers", None)
        if key in params or name not in module._buffers or not callable(init):
            unmapped.append(key)
            continue
        with torch.no_grad():
            init(buffer_device=torch.device("cpu"))
        value = module._buffers.get(name)
        if value is None or value.is_meta:
            unmapped.append(key)
            continue
        fresh[key] = value.detach().clone()
    return fresh, unmapped


# -- to-hf: a native DCP (a flame-ext conversion, or a torchtitan training checkpoint at step N) -> HF names

_NATIVE_LAYER = re.compile(r"^((?:mtp_)?layers)\.(\d+)\.")


def group_of_native_key(key: str) -> str:
    """``layers 3`` for ``layers.3.moe.routed_experts.inner_experts.w1_EFD``; a non-layer key is its own group."""
    m = _NATIVE_LAYER.match(key)
    return f"{m.group(1)} {int(m.group(2))}" if m else key


def _native_group_order(group: str) -> tuple[int, int, str]:
    kind, _, n = group.partition(" ")
    if n.isdigit():
        return (0 if kind == "layers" else 1, int(n), "")
    return (2, 0, group)


@dataclass
class NativeExport:
    """What ``to-hf`` writes from a native checkpoint: every HF tensor (in layer order, so a layer's tensors are
    written together), the native group each comes from, and the native keys of each group."""

    native: NativeModel
    checkpoint: Any  # Path of the DCP folder
    prefix: str
    stored: dict[str, TensorSpec]  # native key (without prefix) -> as stored
    hf_specs: dict[str, TensorSpec]  # HF key -> as written
    group_of: dict[str, str]  # HF key -> native group
    members: dict[str, list[str]]  # native group -> native keys
    dropped: list[str]  # native keys the adapter maps to no HF key

    def reader(self, buffer_bytes: int, as_read: Any = None) -> Callable[[str], Any]:
        """``read(hf_key)``: the HF tensor as consecutive row blocks. A group's native tensors are read whole (one
        layer), ``to_hf`` is applied to them, and its outputs are held until each has been written. ``as_read``
        (a fingerprint recorder) sees every native tensor as stored."""
        from flame_ext.io.dcp import DCPRowReader, row_blocks

        dcp_reader = DCPRowReader(self.checkpoint)
        held: dict[str, dict[str, torch.Tensor]] = {}
        left = {g: sum(1 for k in self.group_of if self.group_of[k] == g) for g in self.members}

        def convert(group: str) -> dict[str, torch.Tensor]:
            native_sd = {}
            for key in self.members[group]:
                spec = self.stored[key]
                value = dcp_reader.rows(self.prefix + key, spec, 0, spec.shape[0] if spec.shape else 1)
                if as_read is not None:
                    as_read.add_rows(self.prefix + key, 0, value)
                native_sd[key] = value
            return self.native.adapter.to_hf(native_sd)

        def read(hf_key: str) -> Any:
            group = self.group_of[hf_key]
            if group not in held:
                held[group] = convert(group)
            spec = self.hf_specs[hf_key]
            value = held[group][hf_key].to(getattr(torch, spec.dtype))
            left[group] -= 1
            if left[group] == 0:
                del held[group]
            if not spec.shape:
                yield value
                return
            for start, end in row_blocks(spec, buffer_bytes):
                yield value[start:end].contiguous()

        return read


def plan_native_export(
    checkpoint: Any, found: dict[str, TensorSpec | None], native: NativeModel, out_dtype: str | None
) -> NativeExport:
    """Map every native key the model asks for to the HF keys ``to_hf`` gives, layer by layer, on ``meta``;
    raises once, listing what is missing or misshapen, before anything is read."""
    from flame_ext.io.dcp import model_prefix

    adapter_name = type(native.adapter).__name__
    asked = state_specs(native.meta_model())
    prefix = model_prefix(found, asked)
    missing = [k for k in asked if found.get(prefix + k) is None]
    shapes = [f"{k}: checkpoint {found[prefix + k].shape}, model asks {s.shape}"  # type: ignore[union-attr]
              for k, s in asked.items() if k not in missing and found[prefix + k].shape != s.shape]  # type: ignore[union-attr]  # fmt: skip
    if missing or shapes:
        detail = "; ".join(([f"missing {len(missing)}: {', '.join(missing)}"] if missing else []) + shapes)
        raise CheckpointFormatError(
            f"{checkpoint}: does not hold torchtitan's {native.module} ({native.config}) model: {detail}"
        )
    stored = {k: found[prefix + k] for k in asked}
    members: dict[str, list[str]] = {}
    for k in asked:
        members.setdefault(group_of_native_key(k), []).append(k)
    hf_specs: dict[str, TensorSpec] = {}
    group_of: dict[str, str] = {}
    dropped: list[str] = []
    for group in sorted(members, key=_native_group_order):
        made = native.adapter.to_hf({k: _meta(stored[k]) for k in members[group]})  # type: ignore[arg-type]
        dropped += [k for k in members[group] if not native.adapter.to_hf({k: _meta(stored[k])})]  # type: ignore[arg-type]
        for hf_key, value in made.items():
            if hf_key in group_of:
                raise CheckpointFormatError(
                    f"{adapter_name}.to_hf maps {group} and {group_of[hf_key]} both to {hf_key}: it does not map "
                    "layer by layer, so flame-ext cannot stream it"
                )
            dtype = dtype_name(value.dtype) if out_dtype is None else out_dtype
            hf_specs[hf_key] = TensorSpec(tuple(value.shape), dtype)
            group_of[hf_key] = group
    return NativeExport(native, checkpoint, prefix, stored, hf_specs, group_of, members, dropped)  # type: ignore[arg-type]
