"""A host's training state as DCP writes it: the flattened keys of a step folder's ``.metadata``, what kind of
state each key is, and a digest for the leaves that are not tensors.

``dcp.save`` calls ``state_dict()`` on every Stateful entry and flattens the nested result, joining the path
with dots (``optimizer.state.<param>.exp_avg``, ``lr_scheduler.last_epoch``, ``dataloader.dp_rank_0``); the
same two torch functions are called here, so the keys are the saved ones by construction.

A non-tensor leaf is digested as sha256 of one serialization, chosen to be the same for equal values whatever
process made them: the bytes themselves for ``bytes`` (torchtitan's dataloader state is pickled bytes) and
for an ``io.BytesIO`` its whole content, whatever its read position (DCP writes the content; flame's
``TrainState`` hands its loss history over as BytesIO objects and seeks them when it loads);
compact JSON with sorted keys for values JSON can hold (numbers, strings, booleans, None, lists, tuples as
lists, dicts with string keys; floats in their shortest round-trip form, NaN and inf as ``NaN``/``Infinity``);
``pickle`` protocol 4 for anything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Iterable, Mapping
from typing import Any, Literal

__all__ = ["Group", "flatten_state", "group_of", "state_digest", "as_state_dicts"]

Group = Literal["model", "optimizer", "state"]


def as_state_dicts(states: Mapping[str, Any]) -> dict[str, Any]:
    """``states`` with every Stateful entry replaced by its ``state_dict()``, as ``dcp.save`` does first.

    Giving ``dcp.save`` this dict instead saves the same values (it leaves plain dicts alone) and calls each
    ``state_dict()`` once, so what is recorded is exactly what is written.
    """
    from torch.distributed.checkpoint.state_dict_saver import _stateful_to_state_dict

    return _stateful_to_state_dict(dict(states))


def flatten_state(states: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's flattened form of ``states`` (Stateful entries turned into their state dicts first): the keys a
    step folder's ``.metadata`` holds, each with its tensor or non-tensor leaf."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(as_state_dicts(states))
    return flat


def group_of(key: str, entries: Iterable[str]) -> Group:
    """What kind of state a flattened key is. ``entries``: the top-level names of the state (``optimizer``,
    ``lr_scheduler``, ...; ``model`` when the model sits nested under it, as torchtitan 0.1 saves it). A key
    under no entry is a model key (torchtitan 0.3 saves the model's keys at the top level)."""
    head = key.split(".", 1)[0]
    names = set(entries)
    if head == "optimizer" and head in names:
        return "optimizer"
    if head == "model" and head in names:
        return "model"
    return "state" if head in names else "model"


def state_digest(value: Any) -> str:
    """sha256 (hex) of a non-tensor leaf's serialization (see the module docstring)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, io.BytesIO):
        data = value.getvalue()
    else:
        try:
            data = b"json:" + json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        except (TypeError, ValueError):
            data = b"pickle:" + pickle.dumps(value, protocol=4)
    return hashlib.sha256(data).hexdigest()
