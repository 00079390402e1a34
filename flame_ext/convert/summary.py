"""What every conversion reports: the dtypes it accepts, a progress bar, and its summary line."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Summary", "Progress", "peak_rss_mb", "nonfinite_warning"]


@dataclass
class Summary:
    """What a conversion wrote and what it cost."""

    destination: Path
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # printed to stderr: the output may not be what was wanted
    manifest: dict[str, Any] | None = None

    def line(self) -> str:
        return (
            f"wrote {self.destination}: {self.tensors} tensors, {self.parameters:,} parameters, "
            f"{self.bytes / 1e6:,.1f} MB in {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:,.0f} MB"
        )


def nonfinite_warning(keys: list[str], where: str) -> str:
    """The one warning for tensors holding NaN or Inf, naming them (the first ten)."""
    shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    return (
        f"{len(keys)} tensors of {where} hold NaN or Inf values, copied as they are: {shown}; "
        "a model with them computes NaN losses: check the source"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """A tqdm bar over bytes when asked for (and when stderr is a terminal or the caller insists)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
