"""Key, shape and dtype parity between what a load asks for and what a checkpoint holds.

Works on ``TensorSpec`` tables only (from ``.metadata``, safetensors headers, or meta tensors), so it
reads no tensor data. Every difference is reported, not the first; when the differences follow one
pattern (every key nested under ``model.``, a wrapper's infix, a padded vocabulary, a tied head left
out, HF names given to a torchtitan model or the reverse: ``checks.native_keys``) one ``layout`` problem
names the pattern and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from flame_ext.checks.native_keys import naming_problem
from flame_ext.checks.recorded import RecordedChoices
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
    notes: list[str] = field(default_factory=list)  # differences the manifest records as chosen


def model_part(found: dict[str, TensorSpec | None]) -> dict[str, TensorSpec]:
    """The model tensors of a checkpoint: drops optimizer / scheduler / dataloader / train-state entries."""
    return {k: v for k, v in found.items() if v is not None and not k.startswith(NON_MODEL_PREFIXES)}


def _layout_problems(
    expected: dict[str, TensorSpec],
    found: dict[str, TensorSpec],
    tied: dict[str, str],
    choices: RecordedChoices,
    tied_out: set[str],
) -> list[tuple[Problem, dict[str, str]]]:
    """Systematic differences, each with its map from found key to the expected key it stands for; the tied
    twins left out (a problem each, on its key) are added to ``tied_out``."""
    out: list[tuple[Problem, dict[str, str]]] = []
    missing = [k for k in expected if k not in found]
    if not missing:
        return out
    nested = [k for k in missing if "model." + k in found]
    if nested and len(nested) >= len(missing) // 2:
        hint = (
            choices.layout_hint()
            if choices.nested
            else "the checkpoint was saved as {'model': state_dict} (flame's stock converter); torchtitan's "
            "model-only initial load asks for flat keys: re-convert with `flame-ext convert` (layout flat, the "
            "default)"
        )
        detail = f"{len(nested)} of {len(expected)} keys sit under an extra 'model.' prefix (e.g. model.{nested[0]})"
        out.append((Problem("layout", "error", None, detail, hint), {"model." + k: k for k in nested}))
    wrapped = {k: strip_wrappers(k) for k in found if strip_wrappers(k) != k and strip_wrappers(k) in expected}
    if wrapped:
        infixes = sorted({i for k in wrapped for i in WRAPPER_INFIXES if i in k})
        example = next(iter(wrapped))
        problem = Problem(
            "layout",
            "error",
            None,
            f"{len(wrapped)} keys carry module-wrapper names {', '.join(repr(i) for i in infixes)} (e.g. {example})",
            "the state dict was taken from a wrapped model (torch.compile / activation checkpointing / DDP); "
            "save from the unwrapped module or strip these infixes before saving",
        )
        out.append((problem, wrapped))
    renamed = {e for _, rename in out for e in rename.values()}
    for alias, source in tied.items():
        if alias in missing and (source in found or source in renamed) and alias not in renamed:
            problem = Problem(
                "layout",
                "error",
                alias,
                f"the model ties {alias} to {source}; the checkpoint holds only {source}",
                "a load asks for both tied keys; write the tied twin too (`flame-ext convert` does)",
            )
            out.append((problem, {}))
            tied_out.add(alias)
    return out


def _with_consequences(problem: Problem, rename: dict[str, str], missing: list[str], unexpected: list[str]) -> Problem:
    """One cause, one error: the keys a layout leaves missing under their own names and unexpected under the
    ones it gave them are counted in its detail, not listed one problem each (flame's stock nested
    checkpoint gave some eighty error lines)."""
    gone = sum(1 for k in missing if k in rename.values())
    extra = sum(1 for k in unexpected if k in rename)
    if not (gone or extra) or problem.key is not None:
        return problem
    return replace(
        problem,
        detail=f"{problem.detail}; so {gone} keys are missing under their own names and {extra} unexpected under "
        "these (not listed one by one)",
    )


def _dtype_problems(
    differ: list[tuple[str, TensorSpec, TensorSpec]], choices: RecordedChoices
) -> tuple[list[Problem], list[str]]:
    """Tensors stored at another dtype than the model's: the dtype the manifest records as chosen is a note;
    one cast applied to every tensor (``fp32 -> bf16``) is one warning with its count; mixed casts one each."""
    notes: list[str] = []
    chosen = [(k, got, want) for k, got, want in differ if choices.chose_dtype(got.dtype)]
    for stored, model in dict.fromkeys((got.dtype, want.dtype) for _, got, want in chosen):
        count = sum(1 for _, got, want in chosen if (got.dtype, want.dtype) == (stored, model))
        notes.append(choices.dtype_note(stored, model, count))
    rest = [d for d in differ if not choices.chose_dtype(d[1].dtype)]
    hint = (
        "the load casts silently; fine when deliberate (e.g. a bf16 checkpoint for mixed-precision training; "
        "`flame-ext convert --dtype` records the choice, and then it is not reported)"
    )
    casts = {(got.dtype, want.dtype) for _, got, want in rest}
    if len(rest) > 1 and len(casts) == 1:
        ((stored, model),) = casts
        detail = f"all {len(rest)} tensors: checkpoint {stored}, model {model}"
        return [Problem("dtype_mismatch", "warning", None, detail, hint)], notes
    problems = [
        Problem("dtype_mismatch", "warning", k, f"checkpoint {got.dtype}, model {want.dtype}", hint)
        for k, got, want in rest
    ]
    return problems, notes


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
    choices: RecordedChoices = RecordedChoices(),
    native_module: str | None = None,
) -> ParityResult:
    """Compare what a load asks for (``expected``) with what a checkpoint holds (``found``).

    ``fresh`` keys are allowed to be absent or present (freshly initialised heads); ``tied`` maps tied
    aliases to their source keys (for a precise hint). Missing, unexpected and shape differences are
    errors; a dtype difference is a warning (a load casts, and a deliberate bf16 checkpoint is fine), and
    none at all when ``choices`` (the manifest) records that dtype as chosen: a note then. A key that a
    layout problem explains is counted in that problem, not listed again as missing and unexpected.
    When the model asks for torchtitan's own names and the checkpoint has HF names (or the reverse), that one
    ``layout`` problem stands for the keys missing and unexpected (counted, not listed); ``native_module``
    names the torchtitan model in its fix (``--layout torchtitan:<module>``).
    """
    fresh = set(fresh)
    have = {k: v for k, v in found.items() if v is not None and not k.startswith(ignore_prefixes)}
    tied_out: set[str] = set()
    layouts = _layout_problems(expected, have, tied or {}, choices, tied_out)
    rename = {f: e for _, r in layouts for f, e in r.items()}
    missing = [k for k in expected if k not in have and k not in fresh]
    unexpected = [k for k in have if k not in expected and k not in fresh]
    result = ParityResult(problems=[_with_consequences(p, r, missing, unexpected) for p, r in layouts])
    naming = naming_problem(expected, have, module=native_module) if len(missing) * 2 > len(expected) else None
    if naming is not None:
        result.problems.append(naming[0])
    listed = naming is None  # the naming problem stands for every missing and unexpected key
    hint = (
        "the load would fail on this key (or leave it at random init if partial loads are allowed); re-convert "
        "from the HF model, or check the model config matches the checkpoint"
    )
    for k in sorted(k for k in missing if listed and k not in rename.values() and k not in tied_out):
        result.problems.append(
            Problem("missing_key", "error", k, "asked for by the model, absent from the checkpoint", hint)
        )
    hint = "a load silently ignores it, so whatever it holds is lost; check the key names of the conversion"
    for k in sorted(k for k in unexpected if listed and k not in rename):
        result.problems.append(
            Problem("unexpected_key", "error", k, "in the checkpoint, not asked for by the model", hint)
        )
    n_shape = 0
    differ: list[tuple[str, TensorSpec, TensorSpec]] = []
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
            differ.append((k, got, want))
    dtype_problems, result.notes = _dtype_problems(differ, choices)
    result.problems += dtype_problems
    # A tied pair is one parameter stored under two names: counted once, as convert and the manifest count it.
    twins = set(tied or {})
    result.counts = {
        "hf_params": sum(s.numel for k, s in expected.items() if k not in fresh and k not in twins),
        "dcp_params": sum(s.numel for k, s in have.items() if k not in fresh and rename.get(k, k) not in twins),
        "missing": len(missing),
        "unexpected": len(unexpected),
        "shape": n_shape,
        "dtype": len(differ),
    }
    return result
