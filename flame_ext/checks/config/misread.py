"""A config the installed transformers (or the trainer's config object) reads differently from the file.

The case this exists for: a transformers-5 config states rope_theta only inside ``rope_parameters``;
transformers 4.x ignores that dict and uses its default rope_theta, and the model built from it computes
something else than the one the file describes. ``diagnose`` checks the model's own config this way, the
guard the source config its manifest records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flame_ext.checks.config.fields import classify
from flame_ext.checks.config.normalize import ROPE_DICTS, config_class, flattened, same_value
from flame_ext.io.hf_config import read_model_config
from flame_ext.io.registry import transformers_major
from flame_ext.report import Problem, Severity

__all__ = ["misread_fields", "installed_reading_problems", "recorded_source_problems"]

# Set by the config class from other fields (Qwen2 drops sliding_window when use_sliding_window is false;
# layer_types is derived from it): a different exposed value there is the class's bookkeeping, not a misreading.
_DERIVED_BY_CLASS = frozenset({"sliding_window", "max_window_layers", "layer_types"})


def _as_read(config_obj: Any) -> dict[str, Any]:
    """What a transformers config object exposes, flattened like the file; a rope dict its class does not take
    (``rope_parameters`` before transformers 5) is dropped: it is stored but no model code reads it."""
    import inspect

    d = config_obj.to_dict()
    taken = set(inspect.signature(type(config_obj).__init__).parameters)
    for name in ROPE_DICTS:
        if name not in taken:
            d.pop(name, None)
    return flattened(d)


def _exposed(read: dict[str, Any], name: str) -> Any:
    """``read[name]``, also under the other rope spelling (transformers 5 moves partial_rotary_factor into the
    rope dict)."""
    if name in read:
        return read[name]
    other = name[len("rope_scaling.") :] if name.startswith("rope_scaling.") else f"rope_scaling.{name}"
    return read.get(other)


def misread_fields(stated: dict[str, Any], config_obj: Any) -> list[tuple[str, Any, Any]]:
    """(field, the file's value, the value ``config_obj`` uses) for every compute field the file states whose
    value the config object does not carry: the model built from it computes something else."""
    own = flattened(stated)
    read = _as_read(config_obj)
    out = []
    for name in sorted(own):
        value = own[name]
        if value is None or name in _DERIVED_BY_CLASS or classify(name, own) != "compute":
            continue
        used = _exposed(read, name)
        if not same_value(value, used):
            out.append((name, value, used))
    return out


def installed_reading_problems(
    config: dict[str, Any],
    *,
    what: str,
    severity: Severity = "error",
    config_obj: Any = None,
    reader: str | None = None,
) -> list[Problem]:
    """``config_mismatch`` for each compute field the installed transformers reads differently from the file
    (``config_obj``: the object a trainer built its model from, named ``reader`` in the report; default: the
    installed class reading ``config``).

    The case this exists for: a transformers-5 config states rope_theta only inside ``rope_parameters``;
    transformers 4.x ignores that dict and uses its default rope_theta, and a buffer repair then computes
    ``inv_freq`` from the misread value. Nothing is reported for a config the installed transformers cannot read
    at all (the other checks say so).
    """
    import transformers

    if config_obj is None:
        cls = config_class(config.get("model_type"))
        if cls is None:
            return []
        from transformers.utils import logging as tf_logging

        verbosity = tf_logging.get_verbosity()  # a config's own oddities (an eos id past the vocabulary) are not
        tf_logging.set_verbosity_error()  # this check's; progress-bar state is left as the caller set it
        try:
            config_obj = cls.from_dict(dict(config))
        except Exception:  # a config class rejects values with many exception types; other checks report it
            return []
        finally:
            tf_logging.set_verbosity(verbosity)
    wrote = config.get("transformers_version") or "an unrecorded version"
    running = transformers.__version__
    reader = reader or f"the installed transformers {running}"
    problems = []
    for name, value, used in misread_fields(config, config_obj):
        fix = (
            f"write {name} = {value!r} at the top level of config.json (transformers 4.x reads rope settings there)"
            if name.startswith("rope") and transformers_major() < 5
            else f"set {name} = {value!r} where the config is read"
        )
        problems.append(
            Problem(
                "config_mismatch",
                severity,
                name,
                f"{what} states {name} = {value!r} (written by transformers {wrote}), but {reader} uses {used!r}",
                f"the model built from this config computes differently from the one it describes: upgrade "
                f"transformers to the version that wrote it ({wrote}), or {fix}",
            )
        )
    return problems


def recorded_source_problems(manifest_path: Path, model_config: Any = None) -> tuple[list[Problem], str | None]:
    """The guard's config check: the source config.json its manifest records (``source.path``, unchanged since
    conversion), against ``model_config`` (the config object the trainer's model was built from: a difference is
    an error) or, without one, as the installed transformers reads it (a warning: the trainer may build from
    another file). Returns (problems, a note when it could not be checked)."""
    from flame_ext.errors import FlameExtError
    from flame_ext.io.manifest import config_hash, read_manifest

    try:
        source = read_manifest(manifest_path).get("source") or {}
    except FlameExtError:
        return [], None  # the reference check reports an unreadable manifest
    folder = source.get("path")
    file = Path(folder) / "config.json" if isinstance(folder, str) else None
    if file is None or not file.is_file():
        where = f"its folder {folder} is not on this machine" if file else f"{manifest_path} records no source path"
        return [], f"config: the source config.json was not checked against the installed transformers ({where})"
    try:
        config = read_model_config(file, what=str(file))
    except FlameExtError as exc:
        return [], f"config: {file} was not checked: {exc}"
    if config_hash(config) != source.get("config_sha256"):
        return [], f"config: {file} changed since the conversion (its hash differs); not checked"
    import transformers

    if isinstance(model_config, transformers.PretrainedConfig):  # an HF model (flame); torchtitan's own have none
        reader = f"the trainer's model (transformers {transformers.__version__})"
        return installed_reading_problems(config, what=str(file), config_obj=model_config, reader=reader), None
    return installed_reading_problems(config, what=str(file), severity="warning"), None
