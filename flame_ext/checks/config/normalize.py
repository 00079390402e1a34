"""One comparable form of a model config, whichever transformers wrote or reads it.

Rope settings are spelled one way (``rope_theta`` and ``rope_type`` at the top level, every other rope
parameter as ``rope_scaling.<name>``), values are plain JSON data, and two values are the same when they
are equal up to float rounding. Reading a config through its transformers class fills in its defaults.
"""

from __future__ import annotations

import json
import math
from typing import Any

from flame_ext.errors import InputError
from flame_ext.io.registry import register_model_type

__all__ = ["ROPE_DICTS", "flattened", "normalized_config", "config_class", "same_value"]

ROPE_DICTS = ("rope_scaling", "rope_parameters")

_JSON_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _flatten_rope(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in ROPE_DICTS}
    for name in ROPE_DICTS:
        rope = d.get(name)
        if not isinstance(rope, dict):
            continue
        for k, v in rope.items():
            if k == "type":  # the pre-4.45 spelling of rope_type
                k = "rope_type"
            if k in ("rope_theta", "rope_type"):
                out.setdefault(k, v)
            else:
                out[f"rope_scaling.{k}"] = v
    out.setdefault("rope_type", "default")
    return out


def flattened(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with one spelling for rope settings across transformers versions, as JSON data."""
    return json.loads(json.dumps(_flatten_rope(d), default=str))


def config_class(model_type: Any) -> Any:
    """The installed transformers' config class of ``model_type``; None when it does not know it."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def normalized_config(config: dict[str, Any], *, what: str) -> dict[str, Any]:
    """The config as its transformers class reads it (defaults filled in), flattened and JSON-comparable."""
    model_type = config.get("model_type")
    register_model_type(str(model_type), what)
    cls = config_class(model_type)
    if cls is None:
        raise InputError(f"{what}: model_type {model_type!r} is not known to the installed transformers")
    try:
        obj = cls.from_dict(dict(config))
    except Exception as exc:  # a config class rejects values with many exception types
        raise InputError(f"{what}: transformers cannot read this config ({str(exc).splitlines()[0][:160]})") from exc
    d = obj.to_dict()
    d.update({k: v for k, v in config.items() if k not in d})  # fields the class does not know: compared as written
    return flattened(d)


def _plain(value: Any) -> Any:
    """A config value as plain JSON data: transformers writes a non-finite float as {"__float__": "Infinity"},
    and a config object holds tuples where the file has lists."""
    if isinstance(value, dict) and set(value) == {"__float__"} and value["__float__"] in _JSON_FLOATS:
        return _JSON_FLOATS[value["__float__"]]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def same_value(a: Any, b: Any) -> bool:
    """Two config values are the same: equal as JSON data, numbers up to float rounding (bools exactly)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b
