"""The tokenizer a trainer feeds the model with, against the model's embedding and config.

A tokenizer with more ids than the embedding has rows makes the first out-of-range id fail (an
``IndexError`` on CPU, a device-side assert on GPU) or, with a padded embedding, train untrained rows.
Special-token ids that differ from the config's change what the data looks like (documents separated by
another token than the model learned), not what the weights compute: warnings.
"""

from __future__ import annotations

from typing import Any

from flame_ext.model.reference_loss import TOKENIZER_FILES, has_tokenizer
from flame_ext.report import Problem

__all__ = ["TOKENIZER_FILES", "has_tokenizer", "tokenizer_size", "tokenizer_problems"]

_SPECIALS = ("bos", "eos", "pad")


def tokenizer_size(tokenizer: Any) -> int:
    """Ids the tokenizer can produce: its length with added tokens, or the largest id + 1 if ids have holes."""
    size = len(tokenizer)
    try:
        size = max(size, max(tokenizer.get_vocab().values()) + 1)
    except (AttributeError, ValueError, NotImplementedError):
        pass
    return size


def _config_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def tokenizer_problems(
    tokenizer: Any, *, name: str, embedding_rows: int, config: dict[str, Any], source_own: bool = False
) -> list[Problem]:
    """Size against the embedding (error when larger), bos/eos/pad ids against the config (warnings).

    ``source_own``: the tokenizer is the source model's own, so ids beyond the embedding are a property of
    the source (a Qwen2-style tokenizer adding ``<|endoftext|>`` past the embedding), which the conversion
    copied faithfully: a warning about the source, not an error about the checkpoint.
    """
    problems: list[Problem] = []
    size = tokenizer_size(tokenizer)
    if size > embedding_rows and source_own:
        problems.append(
            Problem(
                "tokenizer_mismatch",
                "warning",
                "vocab_size",
                f"the source model's own tokenizer ({name}) produces ids up to {size - 1}, beyond its "
                f"{embedding_rows}-row embedding: a property of the source, which the conversion copied as is",
                "training data holding those ids fails at the first such batch (IndexError / device-side assert): "
                "keep them out of the data, or resize the embedding (and vocab_size) before training",
            )
        )
    elif size > embedding_rows:
        problems.append(
            Problem(
                "tokenizer_mismatch",
                "error",
                "vocab_size",
                f"tokenizer {name} produces ids up to {size - 1}; the embedding has {embedding_rows} rows",
                "ids beyond the embedding fail at the first batch that holds one (IndexError / device-side assert); "
                "use the model's own tokenizer, or resize the embedding (and vocab_size) before training",
            )
        )
    for special in _SPECIALS:
        tok_id = getattr(tokenizer, f"{special}_token_id", None)
        cfg_ids = _config_ids(config.get(f"{special}_token_id"))
        if tok_id is None or not cfg_ids or tok_id in cfg_ids:
            continue
        shown = sorted(cfg_ids)[0] if len(cfg_ids) == 1 else sorted(cfg_ids)
        problems.append(
            Problem(
                "tokenizer_mismatch",
                "warning",
                f"{special}_token_id",
                f"tokenizer {name} has {special}_token_id {tok_id}, the model config {shown}",
                f"the data will mark {special} with another token than the model learned; use the model's tokenizer, "
                f"or set {special}_token_id consistently in both",
            )
        )
    return problems
