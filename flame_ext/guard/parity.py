"""Before any tensor is read: the keys, global shapes and dtypes a load will request against the
checkpoint's metadata (``checks.keys.compare_specs``), plus what only a host's load can get wrong: a flat
checkpoint under a nested full load, and training states a converted checkpoint never holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flame_ext.checks.recorded import RecordedChoices
from flame_ext.guard.state import RequestedLoad
from flame_ext.io.specs import TensorSpec
from flame_ext.report import Problem

__all__ = ["parity_problems"]


def parity_problems(
    requested: RequestedLoad,
    found: dict[str, TensorSpec | None],
    *,
    fresh: list[str],
    tied: dict[str, str],
    counts: dict[str, int],
    choices: RecordedChoices = RecordedChoices(),
    notes: list[str] | None = None,
    native_module: str | None = None,
) -> list[Problem]:
    """Every problem of the request against ``found`` at once; ``counts`` gets the key counts by kind, ``notes``
    what the manifest records as chosen (``choices``: a dtype is then no problem; a nested layout still is
    under a flat load, which cannot take it, and its hint says it was chosen). ``native_module`` is the
    torchtitan model's module (for the fix of HF names given to it)."""
    from flame_ext.checks.keys import compare_specs

    result = compare_specs(requested.model, found, fresh=fresh, tied=tied, choices=choices, native_module=native_module)
    counts.update(result.counts)
    if notes is not None:
        notes.extend(result.notes)
    problems = list(result.problems)
    if requested.model_prefix:
        problems += _flat_into_nested(requested, found)
    for name in requested.other_states:
        if not any(k == name or k.startswith(name + ".") for k in found):
            counts["missing"] = counts.get("missing", 0) + 1
            problems.append(_missing_state(name))
    return problems


def _missing_state(name: str) -> Problem:
    return Problem(
        "missing_key",
        "error",
        f"{name}.*",
        f"the load asks for the {name} state (a full training-state load); the checkpoint holds none",
        "a converted checkpoint holds weights only: load model weights only (torchtitan 0.1: "
        "checkpoint.initial_load_model_weights_only = true; 0.3: initial_load_model_only = true), "
        f"or add '{name}' to checkpoint.exclude_from_loading",
    )


def _flat_into_nested(requested: RequestedLoad, found: Mapping[str, Any]) -> list[Problem]:
    """The reverse of parity's nested-checkpoint hint: a flat checkpoint under a full (nested) load."""
    prefix = requested.model_prefix
    plain = [k for k in requested.model if k not in found and k[len(prefix) :] in found]
    if not plain or len(plain) < len(requested.model) // 2:
        return []
    return [
        Problem(
            "layout",
            "error",
            None,
            f"{len(plain)} of {len(requested.model)} keys are asked for under '{prefix}' (a full training-state "
            f"load) but the checkpoint holds them flat (e.g. {plain[0][len(prefix) :]})",
            "load the converted checkpoint model-only (torchtitan 0.1: checkpoint.initial_load_model_weights_only = "
            "true, or put it in the step-0 folder), or convert with `flame-ext convert --layout nested`",
        )
    ]
