"""What every conversion reports: the dtypes it accepts, a progress bar, and its summary line."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DTYPES", "Summary", "Progress", "peak_rss_mb"]

DTYPES = ("auto", "bfloat16", "float32")


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
    manifest: dict[str, Any] | None = None

    def line(self) -> str:
        return (
            f"wrote {self.destination}: {self.tensors} tensors, {self.parameters:,} parameters, "
            f"{self.bytes / 1e6:,.1f} MB in {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:,.0f} MB"
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
