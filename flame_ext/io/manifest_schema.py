"""The manifest schema (``flame_ext/schemas/manifest.schema.json``) applied to what a manifest file holds.

The schema is the one declaration of what ``flame_ext.json``, a ``flame-ext reference`` file and a step
folder's save-time record may hold: every field's type, every number's bounds, the reference batch's cap.
It is enforced with ``jsonschema`` (imported when the first manifest is read), so the file users and tools
read is the rule the code applies. Two facts of a reference record need more than a schema and are checked
here after it: the rows of ids form a rectangle, and there is one loss per predicted token.

A violation is one ``CheckpointFormatError``: the file, the field's path in it, what is wrong, the fix.
The first violation found is reported, in the schema's order (the token rows' length before their ids),
so a row of a million ids is refused without reading them.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flame_ext.errors import CheckpointFormatError, short_value

__all__ = [
    "SCHEMA_PATH",
    "MAX_REFERENCE_ROWS",
    "MAX_REFERENCE_TOKENS",
    "NonFinite",
    "check_manifest",
    "schema",
]

SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "manifest.schema.json"
# The reference batch's cap (the schema declares it; these name it for messages and docs): the default batch
# is 2 rows of 512 tokens, and the guard runs it on every rank before step 1.
MAX_REFERENCE_ROWS = 64
MAX_REFERENCE_TOKENS = 8192

_FIX = {
    "checkpoint": "re-convert with `flame-ext convert`, or record a reference with `flame-ext reference`",
    "reference": "re-create it with `flame-ext reference --model HF --out FILE`",
    "training_step": "it is written when the step is saved: save the step again, or remove the file",
}
_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


class NonFinite:
    """``NaN``, ``Infinity`` or ``-Infinity`` read from a manifest: of no JSON type, so the schema names it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


@functools.cache
def schema() -> dict[str, Any]:
    """The manifest schema as shipped with the package."""
    return json.loads(SCHEMA_PATH.read_text())


@functools.cache
def _validator() -> Any:
    import jsonschema

    base = jsonschema.Draft202012Validator
    # JSON integers only: a count of 0.5 or 1.0 is not a count, and true is not 1 (the default checker takes
    # 1.0 as an integer; bool is already excluded).
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    items = functools.partial(_items, base.VALIDATORS["items"])
    return jsonschema.validators.extend(base, validators={"items": items}, type_checker=checker)(schema())


_SCALAR_ITEMS = {"type", "minimum", "maximum", "description"}
_SCALAR_TYPES = {"integer": (int,), "number": (int, float)}


def _items(generic: Any, validator: Any, items: Any, instance: Any, schema: dict[str, Any]) -> Any:
    """jsonschema's ``items``, with arrays of plain numbers (a reference batch holds up to a million) checked
    in one loop: the same three rules (JSON type, minimum, maximum), 30x faster than an item at a time.
    An item that breaks them is handed to jsonschema, which words the error."""
    if not (isinstance(items, dict) and items.keys() <= _SCALAR_ITEMS and items.get("type") in _SCALAR_TYPES):
        yield from generic(validator, items, instance, schema)
        return
    if not isinstance(instance, list):
        return
    types, low, high = _SCALAR_TYPES[items["type"]], items.get("minimum", -math.inf), items.get("maximum", math.inf)
    for index in range(len(schema.get("prefixItems", [])), len(instance)):
        value = instance[index]
        if type(value) not in types or not low <= value <= high:  # exact types: json makes no subclasses
            yield from validator.descend(instance=value, schema=items, path=index)


def check_manifest(data: dict[str, Any], path: str | Path) -> None:
    """``data`` (a manifest read from ``path``) against the schema, then the reference's shape; raises
    ``CheckpointFormatError`` naming the file, the field and the fix."""
    kind = data.get("kind", "checkpoint")
    fix = _FIX.get(kind, _FIX["checkpoint"]) if isinstance(kind, str) else _FIX["checkpoint"]
    error = next(iter(_validator().iter_errors(data)), None)
    if error is not None:
        where = _field(error.absolute_path)
        if "propertyNames" in error.relative_schema_path:  # the error is about a key of the object at ``where``
            where += " has a key that"
        raise CheckpointFormatError(f"{path}: not a valid manifest: {where} {_problem(error)}; {fix}")
    if isinstance(data.get("reference"), dict):
        problem = _reference_shape(data["reference"])
        if problem:
            raise CheckpointFormatError(f"{path}: not a valid manifest: reference.{problem}; {fix}")


def _reference_shape(ref: dict[str, Any]) -> str | None:
    """What the schema cannot say of a reference record: rows of one length, one loss per predicted token."""
    ids, losses = ref["token_ids"], ref["loss_per_token"]
    lengths = sorted({len(row) for row in ids})
    if len(lengths) != 1:
        return f"token_ids has rows of different lengths ({', '.join(map(str, lengths[:4]))})"
    rows, per_row = len(ids), lengths[0] - 1
    if len(losses) != rows or any(len(row) != per_row for row in losses):
        return f"loss_per_token is not {rows} rows of {per_row} losses (one per predicted token of token_ids)"
    return None


def _field(path: Iterable[Any]) -> str:
    """``reference.token_ids[0][5]``, ``tensors["model.norm.weight"].shape``: where in the file."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{short_value(part)}]"
    return out or "the top level"


def _kind_of(value: Any) -> str:
    """A value and its JSON type: ``3 (an integer)``, ``"x" (a string)``, ``an object of 2``."""
    if isinstance(value, (dict, list)):
        return short_value(value)
    json_type = next(
        (
            name
            for t, name in ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"))
            if isinstance(value, t)
        ),
        "null",
    )
    return f"{short_value(value)} ({json_type})"


def _problem(error: Any) -> str:
    """What is wrong with the value at the error's path, in words, with the bound it breaks."""
    v, value, rule = error.validator, error.instance, error.validator_value
    if v == "type":
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in ([rule] if isinstance(rule, str) else rule))
        if isinstance(value, NonFinite):
            return f"is {value}; it must be {wanted} (strict JSON has no NaN or Infinity)"
        return f"is {_kind_of(value)}; it must be {wanted}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"is {short_value(value)}; it must be {bound} {rule if isinstance(rule, int) else format(rule, 'g')}"
    if v == "required":
        missing = [name for name in rule if name not in value]
        return f"lacks the field {short_value(missing[0] if missing else rule[0])}"
    if v == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        extra = [name for name in value if name not in known]
        return f"has an unknown field {short_value(extra[0] if extra else '?')} (not part of manifest format 1)"
    if v in ("enum", "const"):
        choices = rule if v == "enum" else [rule]
        shown = ", ".join(json.dumps(c) for c in choices)
        shown = shown if len(shown) <= 240 else "the declared value"
        return f"is {short_value(value)}; it must be {'one of ' if v == 'enum' else ''}{shown}"
    if v in ("minItems", "maxItems"):
        items = short_value(value).removeprefix("a list of ")
        return f"has {items}; it must have at {'least' if v == 'minItems' else 'most'} {rule:,}"
    if v in ("minLength", "maxLength"):
        least = "least" if v == "minLength" else "most"
        return f"is a string of {len(value):,} characters; it must have at {least} {rule:,}"
    if v in ("minProperties", "maxProperties"):
        return f"has {len(value):,} entries; at {'least' if v == 'minProperties' else 'most'} {rule:,}"
    if v == "pattern":
        return f"is {short_value(value)}, not of the declared form ({error.schema.get('description') or rule})"
    return f"is {short_value(value)}: {v} {short_value(rule)}"
