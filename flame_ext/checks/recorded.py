"""What a checkpoint's manifest records as chosen at conversion: its key layout and its dtype.

``flame-ext convert --layout nested`` and ``--dtype bfloat16`` are documented choices, and the manifest
(``flame_ext.json``) records both. A difference from the HF model that one of them explains is the choice,
not a fault: ``diagnose`` and the training guard both ask this module (the one rule) and report it as a note.
Where a load cannot take the choice (a model-only initial load asks for flat keys), the guard still reports
the error, and the hint says it was chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NESTED_PREFIX", "RecordedChoices", "recorded_choices"]

# The prefix ``convert --layout nested`` writes every model key under ({"model": state_dict}, as flame's
# stock converter and torchtitan 0.1's full training checkpoints do).
NESTED_PREFIX = "model."


@dataclass(frozen=True)
class RecordedChoices:
    """The layout and dtype a manifest records; None where nothing is recorded (no manifest, ``dtype auto``)."""

    layout: str | None = None
    dtype: str | None = None
    where: str = "flame_ext.json"

    @property
    def nested(self) -> bool:
        return self.layout == "nested"

    def chose_dtype(self, dtype: str) -> bool:
        """True when the checkpoint holds ``dtype`` because the conversion was asked for it."""
        return self.dtype is not None and dtype == self.dtype

    def dtype_note(self, stored: str, model: str, count: int) -> str:
        return (
            f"dtype {stored}, chosen at conversion (`convert --dtype {stored}`, recorded in {self.where}): the model "
            f"is {model}, and a load casts the {count} tensor{'s' if count != 1 else ''}"
        )

    def layout_note(self, count: int) -> str:
        return (
            f"layout nested, chosen at conversion (`convert --layout nested`, recorded in {self.where}): the "
            f"{count} model keys sit under '{NESTED_PREFIX}', as a full training-state load (torchtitan 0.1) asks "
            "for them; they are compared under their flat names"
        )

    def layout_hint(self) -> str:
        """The hint of a nested-under-flat ``layout`` error when the nesting was chosen."""
        return (
            f"converted with `--layout nested` (recorded in {self.where}), for a full training-state load; this "
            "load is model-only and asks for flat keys: re-convert with `flame-ext convert` (layout flat, the "
            "default), or load it as a full state (torchtitan 0.1: checkpoint.initial_load_model_weights_only = false)"
        )


def recorded_choices(manifest: Mapping[str, Any] | None, where: str = "flame_ext.json") -> RecordedChoices:
    """The choices a converted checkpoint's manifest records. A training step's record, a reference file or no
    manifest records none."""
    if not manifest or manifest.get("kind", "checkpoint") != "checkpoint":
        return RecordedChoices(where=where)
    layout, dtype = manifest.get("layout"), manifest.get("dtype")
    return RecordedChoices(
        layout=layout if layout in ("flat", "nested") else None,
        dtype=dtype if isinstance(dtype, str) and dtype != "auto" else None,
        where=where,
    )
