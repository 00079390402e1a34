"""Model configs and other small JSON files of a model folder, read as untrusted data.

A config is checked before anything is allocated from it: the sizes a model is built from must be positive
integers, and the model they imply must fit the weights actually present. Building a model on ``meta`` costs
no memory but does cost Python work per layer: a config asking for two million layers kept a run busy for
minutes before any other check. The bound used here undercounts every architecture (one square matrix per
layer plus the embedding), so a real model never trips it, and it is computed from the config alone.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame_ext.errors import CheckpointFormatError, InputError

__all__ = [
    "SIZE_FIELDS",
    "MAX_JSON_BYTES",
    "read_json_object",
    "read_model_config",
    "check_config",
    "implied_parameters",
]

MAX_JSON_BYTES = 64 * 1024 * 1024  # a config or index is kilobytes; a tokenizer.json of a large vocabulary, MBs

# Sizes a model is built from, under the names transformers configs use: each a positive integer when set.
SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "num_layers",
    "moe_intermediate_size",
)
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
# A config implying more parameters than this per byte of weights is refused: 4-bit weights hold 2 per byte,
# and the bound below undercounts, so a real model stays far inside it.
_PARAMS_PER_BYTE = 8


def read_json_object(
    path: Path, *, what: str, max_bytes: int = MAX_JSON_BYTES, parse_constant: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """A JSON object from a regular file of at most ``max_bytes``; one ``CheckpointFormatError`` otherwise.

    The file is opened without blocking and its kind checked on the open descriptor: a FIFO or a device
    (a symlink to /dev/zero) put in its place after a check by name is refused, never read. ``parse_constant``
    receives ``NaN``, ``Infinity`` and ``-Infinity`` (Python's json accepts them; strict JSON has none).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointFormatError(f"{path}: not a regular file; expected a {what} (JSON)")
            if st.st_size > max_bytes:
                raise CheckpointFormatError(
                    f"{path}: {st.st_size:,} bytes, too large for a {what} (at most {max_bytes:,})"
                )
            data = json.loads(f.read(max_bytes + 1), parse_constant=parse_constant)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointFormatError(f"{path}: not a valid {what} (not JSON: {str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: holds a JSON {type(data).__name__}, not an object; expected a {what}")
    return data


def check_config(config: dict[str, Any], *, what: str, weight_bytes: int | None = None) -> None:
    """Sizes are positive integers (top level and nested sub-configs); with ``weight_bytes``, the model they
    imply fits the weights present. Raises ``CheckpointFormatError`` naming the field."""
    _check_sizes(config, what, "")
    if weight_bytes is None:
        return
    implied = implied_parameters(config)
    if implied > _PARAMS_PER_BYTE * max(weight_bytes, 1):
        raise CheckpointFormatError(
            f"{what}: the config implies at least {implied:,} parameters, but the weights hold {weight_bytes:,} bytes; "
            "it is not the config of these weights (check hidden_size, num_hidden_layers, vocab_size)"
        )


def _check_sizes(config: dict[str, Any], what: str, prefix: str) -> None:
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise CheckpointFormatError(f"{what}: {prefix}{name} is {value!r}; it must be a positive integer")
    for key, value in config.items():
        if key.endswith("_config") and isinstance(value, dict):  # text_config, vision_config, ...
            _check_sizes(value, what, f"{prefix}{key}.")


def implied_parameters(config: dict[str, Any]) -> int:
    """A lower bound on the parameters a config asks for: one hidden x hidden matrix per layer plus the
    embedding (the text sub-config's, for a multimodal config without its own sizes)."""
    if not any(config.get(n) for n in _HIDDEN) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    hidden = next((config[n] for n in _HIDDEN if isinstance(config.get(n), int)), 0)
    layers = next((config[n] for n in _LAYERS if isinstance(config.get(n), int)), 0)
    vocab = config.get("vocab_size")
    return layers * hidden * hidden + (vocab if isinstance(vocab, int) else 0) * hidden


def read_model_config(file: Path, *, what: str | None = None, weight_bytes: int | None = None) -> dict[str, Any]:
    """A transformers ``config.json``: a JSON object with a ``model_type``, checked by ``check_config``."""
    what = what or str(file)
    config = read_json_object(file, what="transformers model config")
    if "model_type" not in config:
        raise CheckpointFormatError(f"{what}: no model_type; not a transformers config")
    check_config(config, what=what, weight_bytes=weight_bytes)
    return config
