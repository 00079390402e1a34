"""Key, shape and dtype parity between what a load asks for and what a checkpoint holds.

Works on ``TensorSpec`` tables only (from ``.metadata``, safetensors headers, or meta tensors), so it
reads no tensor data. Every difference is reported, not the first; when the differences follow one
pattern (every key nested under ``model.``, a wrapper's infix, a padded vocabulary, a tied head left
out) one ``layout`` problem names the pattern and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flame_ext.io.dcp import NON_MODEL_PREFIXES
from flame_ext.io.key_names import WRAPPER_INFIXES, strip_wrappers
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

__all__ = ["ParityResult", "compare_specs", "model_part"]

_PAD_MULTIPLES = (512, 256, 128, 64, 32, 16, 8)


@dataclass
class ParityResult:
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def model_part(found: dict[str, TensorSpec | None]) -> dict[str, TensorSpec]:
    """The model tensors of a checkpoint: drops optimizer / scheduler / dataloader / train-state entries."""
    return {k: v for k, v in found.items() if v is not None and not k.startswith(NON_MODEL_PREFIXES)}


def _layout_problems(
    expected: dict[str, TensorSpec], found: dict[str, TensorSpec], tied: dict[str, str]
) -> tuple[list[Problem], dict[str, str]]:
    """Systematic differences, and a map from found key to the expected key it stands for."""
    problems: list[Problem] = []
    rename: dict[str, str] = {}
    missing = [k for k in expected if k not in found]
    if not missing:
        return problems, rename
    nested = [k for k in missing if "model." + k in found]
    if nested and len(nested) >= len(missing) // 2:
        problems.append(
            Problem(
                "layout",
                "error",
                None,
                f"{len(nested)} of {len(expected)} keys sit under an extra 'model.' prefix (e.g. model.{nested[0]})",
                "the checkpoint was saved as {'model': state_dict} (flame's stock converter); torchtitan's model-only "
                "initial load asks for flat keys: re-convert with `flame-ext convert` (layout flat, the default)",
            )
        )
        rename.update({"model." + k: k for k in nested})
    wrapped = {k: strip_wrappers(k) for k in found if strip_wrappers(k) != k and strip_wrappers(k) in expected}
    if wrapped:
        infixes = sorted({i for k in wrapped for i in WRAPPER_INFIXES if i in k})
        example = next(iter(wrapped))
        problems.append(
            Problem(
                "layout",
                "error",
                None,
                f"{len(wrapped)} keys carry module-wrapper names {', '.join(repr(i) for i in infixes)} (e.g. "
                f"{example})",
                "the state dict was taken from a wrapped model (torch.compile / activation checkpointing / DDP); "
                "save from the unwrapped module or strip these infixes before saving",
            )
        )
        rename.update(wrapped)
    for alias, source in tied.items():
        if alias in missing and (source in found or source in rename.values()) and alias not in rename.values():
            problems.append(
                Problem(
                    "layout",
                    "error",
                    alias,
                    f"the model ties {alias} to {source}; the checkpoint holds only {source}",
                    "a load asks for both tied keys; write the tied twin too (`flame-ext convert` does)",
                )
            )
    return problems, rename


def _vocab_padding(key: str, want: TensorSpec, have: TensorSpec) -> Problem | None:
    if len(want.shape) != 2 or want.shape[1:] != have.shape[1:] or have.shape[0] <= want.shape[0]:
        return None
    multiple = next((m for m in _PAD_MULTIPLES if have.shape[0] % m == 0), None)
    if multiple is None or have.shape[0] - want.shape[0] >= multiple:
        return None
    return Problem(
        "layout",
        "error",
        key,
        f"vocabulary padded from {want.shape[0]} to {have.shape[0]} rows (a multiple of {multiple})",
        "the checkpoint was written for a padded vocab_size; set vocab_size in the model config to "
        f"{have.shape[0]} (and keep the tokenizer's ids below {want.shape[0]}), or convert without padding",
    )


def compare_specs(
    expected: dict[str, TensorSpec],
    found: dict[str, TensorSpec | None],
    *,
    fresh: Iterable[str] = (),
    tied: dict[str, str] | None = None,
    ignore_prefixes: tuple[str, ...] = NON_MODEL_PREFIXES,
) -> ParityResult:
    """Compare what a load asks for (``expected``) with what a checkpoint holds (``found``).

    ``fresh`` keys are allowed to be absent or present (freshly initialised heads); ``tied`` maps tied
    aliases to their source keys (for a precise hint). Missing, unexpected and shape differences are
    errors; a dtype difference is a warning (a load casts, and a deliberate bf16 checkpoint is fine).
    """
    fresh = set(fresh)
    have = {k: v for k, v in found.items() if v is not None and not k.startswith(ignore_prefixes)}
    layout, rename = _layout_problems(expected, have, tied or {})
    result = ParityResult(problems=list(layout))
    missing = [k for k in expected if k not in have and k not in fresh]
    unexpected = [k for k in have if k not in expected and k not in fresh]
    for k in sorted(missing):
        stands_in = [f for f, e in rename.items() if e == k]
        hint = (
            f"the checkpoint has it as {stands_in[0]}: see the layout problem"
            if stands_in
            else "the load would fail on this key (or leave it at random init if partial loads are allowed); "
            "re-convert from the HF model, or check the model config matches the checkpoint"
        )
        result.problems.append(
            Problem("missing_key", "error", k, "asked for by the model, absent from the checkpoint", hint)
        )
    for k in sorted(unexpected):
        hint = (
            f"it stands for {rename[k]}: see the layout problem"
            if k in rename
            else "a load silently ignores it, so whatever it holds is lost; check the key names of the conversion"
        )
        result.problems.append(
            Problem("unexpected_key", "error", k, "in the checkpoint, not asked for by the model", hint)
        )
    n_shape = n_dtype = 0
    for k, want in expected.items():
        got = have.get(k) or next((have[f] for f, e in rename.items() if e == k and f in have), None)
        if got is None:
            continue
        if got.shape != want.shape:
            n_shape += 1
            padding = _vocab_padding(k, want, got)
            if padding is not None:
                result.problems.append(padding)
            result.problems.append(
                Problem(
                    "shape_mismatch",
                    "error",
                    k,
                    f"checkpoint {list(got.shape)}, model {list(want.shape)}",
                    "the load fails with 'Size mismatch': the checkpoint was made for another config",
                )
            )
        elif got.dtype != want.dtype:
            n_dtype += 1
            result.problems.append(
                Problem(
                    "dtype_mismatch",
                    "warning",
                    k,
                    f"checkpoint {got.dtype}, model {want.dtype}",
                    "the load casts silently; fine when deliberate (e.g. a bf16 checkpoint for mixed-precision "
                    "training)",
                )
            )
    # A tied pair is one parameter stored under two names: counted once, as convert and the manifest count it.
    twins = set(tied or {})
    result.counts = {
        "hf_params": sum(s.numel for k, s in expected.items() if k not in fresh and k not in twins),
        "dcp_params": sum(s.numel for k, s in have.items() if k not in fresh and rename.get(k, k) not in twins),
        "missing": len(missing),
        "unexpected": len(unexpected),
        "shape": n_shape,
        "dtype": n_dtype,
    }
    return result
