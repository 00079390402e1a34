"""The guard's settings, declared once.

Hosts carry them as ``checkpoint.<name>`` (flame's TOML/argparse JobConfig, torchtitan 0.3's ``Config``
dataclasses); every host form is derived from this declaration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flame_ext.errors import GuardConfigError

__all__ = ["GuardConfig"]


@dataclass
class GuardConfig:
    """The guard's settings; hosts carry them as ``checkpoint.<name>`` (flame TOML, torchtitan Config)."""

    validate_initial_load: bool = False
    """Check the initial load (step-0 folder or initial_load_path); resumes are never checked."""
    initial_load_max_loss_delta: float = 0.1
    """Largest |step-0 loss - HF reference loss| in nats that passes."""
    initial_load_reference: str | None = None
    """Manifest or reference file (`flame-ext reference`); default: flame_ext.json in the loaded checkpoint."""
    initial_load_repair_buffers: bool = True
    """Recompute wrong non-persistent buffers (RoPE inv_freq) from the config instead of failing."""
    initial_load_plot: str | None = None
    """PNG file for the per-position step-0 loss against the HF reference (rank 0 writes it; needs flame-ext[plot])."""

    def __post_init__(self) -> None:
        for name in ("validate_initial_load", "initial_load_repair_buffers"):
            if not isinstance(getattr(self, name), bool):
                raise GuardConfigError(f"checkpoint.{name} = {getattr(self, name)!r}: must be true or false")
        delta = self.initial_load_max_loss_delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
            raise GuardConfigError(
                f"checkpoint.initial_load_max_loss_delta = {delta!r}: must be a finite number of nats >= 0 (default 0.1)"
            )
        self.initial_load_max_loss_delta = float(delta)
        ref = self.initial_load_reference
        if ref is not None and (not isinstance(ref, str) or not ref.strip()):
            raise GuardConfigError(f"checkpoint.initial_load_reference = {ref!r}: must be a file path or unset")
        if ref is not None:
            self.initial_load_reference = str(Path(ref.strip()).expanduser())
        self._check_plot()

    def _check_plot(self) -> None:
        plot = self.initial_load_plot
        if plot is None:
            return
        if not isinstance(plot, str) or not plot.strip().lower().endswith(".png"):
            raise GuardConfigError(
                f"checkpoint.initial_load_plot = {plot!r}: must be a file path ending in .png, or unset"
            )
        from flame_ext.io.plot import matplotlib_missing

        if matplotlib_missing():
            raise GuardConfigError(
                f"checkpoint.initial_load_plot = {plot!r}: drawing needs matplotlib: pip install flame-ext[plot]"
            )
        self.initial_load_plot = str(Path(plot.strip()).expanduser())

    @classmethod
    def from_section(cls, section: Any) -> GuardConfig:
        """Read the fields from a host's checkpoint config; a stock config without them means "off"."""
        defaults = cls()
        return cls(**{name: getattr(section, name, getattr(defaults, name)) for name in asdict(defaults)})
