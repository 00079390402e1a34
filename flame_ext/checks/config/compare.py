"""The training config against the HF config the weights were trained with (``diagnose --train-config``).

flame builds its model from ``--model.config``, not from the checkpoint: a config that differs in a field
that changes the computation (``rope_theta``, a norm epsilon, the head layout, ...) gives a model whose
keys and shapes may all match and which still computes something else. Both configs are read through the
transformers config class of their ``model_type``, so defaults are filled in and renamed fields
(``rope_scaling`` -> ``rope_parameters`` in transformers 5) line up; each differing field is reported as
its tier in ``fields`` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flame_ext.checks.config.fields import classify
from flame_ext.checks.config.normalize import normalized_config, same_value
from flame_ext.errors import InputError
from flame_ext.io.hf_config import read_model_config
from flame_ext.report import Problem, Severity

__all__ = ["read_config_file", "compare_configs"]

# What each reported tier means for the user, and what to do: (severity, note on the detail, hint).
_VERDICTS: dict[str, tuple[Severity, str, str]] = {
    "compute": (
        "error",
        "",
        "the trainer builds a model that computes differently from the one the weights were trained as; "
        "set {name} = {hf!r} in the training config (or convert from a model trained with {train!r})",
    ),
    "training": (
        "warning",
        "",
        "changes training (regularisation, special-token ids or length limits), not what the weights compute; "
        "make sure it is deliberate",
    ),
    "unlisted": (
        "warning",
        " (a field flame-ext does not classify)",
        "check whether this field changes the computation of the model; if it does, use the HF value",
    ),
}


def read_config_file(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A config.json given as a file or as the folder holding it; one clear error otherwise."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise InputError(f"--train-config {path}: no such file or folder")
    if not file.exists():
        raise InputError(f"--train-config {path}: no config.json in this folder")
    data = read_model_config(file, what=f"--train-config {file}")
    return data, file


def compare_configs(train: dict[str, Any], hf: dict[str, Any], *, train_name: str, hf_name: str) -> list[Problem]:
    """Every differing field that matters, with both values; a config of another architecture is bad input."""
    if train.get("model_type") != hf.get("model_type"):
        raise InputError(
            f"--train-config {train_name}: model_type {train.get('model_type')!r}, but the HF model {hf_name} is "
            f"{hf.get('model_type')!r}; pass the config the trainer builds this model from"
        )
    a = normalized_config(train, what=f"--train-config {train_name}")
    b = normalized_config(hf, what=hf_name)
    problems = []
    for name in sorted(set(a) | set(b)):
        va, vb = a.get(name), b.get(name)
        tier = classify(name, b)
        if tier == "ignored" or same_value(va, vb):
            continue
        severity, note, hint = _VERDICTS[tier]
        detail = f"training config {va!r}, HF config {vb!r}{note}"
        problems.append(Problem("config_mismatch", severity, name, detail, hint.format(name=name, hf=vb, train=va)))
    return problems
