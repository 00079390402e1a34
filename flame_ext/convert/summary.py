"""What every conversion reports: the dtypes it accepts, a progress bar, and its summary line."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Summary", "Progress", "command_seconds", "peak_rss_mb", "nonfinite_warning"]


@dataclass
class Summary:
    """What a conversion wrote and what it cost."""

    destination: Path
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    seconds: float = 0.0  # the conversion's; a command prints its own wall time instead (``command_seconds``)
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


_IMPORTED = time.monotonic()


def command_seconds() -> float:
    """Seconds since this process started, interpreter start-up and imports included: the wall time ``time``
    shows for a command, which is what a command's summary line states (the conversion alone can be half of
    it on a busy machine: importing torch and transformers is the rest). Read from ``/proc`` (Linux); elsewhere,
    the time since flame-ext's conversion code was imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22 (starttime, in clock ticks after boot) counted after the command name, which may hold spaces.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


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
