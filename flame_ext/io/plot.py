"""The per-position loss of the HF reference against the checkpoint, as a PNG (``diagnose --plot``, the guard's
``initial_load_plot``).

Two panels share the position axis: the two losses (smoothed), and their gap with the threshold band. The
gap is what tells causes apart at a glance: a fault in positional encoding (RoPE ``inv_freq``, a q/k layout)
leaves the first positions right and rises with position; a wrong weight elsewhere shifts every position
alike. Position buckets (the report's ``[start, end)`` ranges) are marked. matplotlib is an optional
dependency (``pip install flame-ext[plot]``), imported only here and only when a plot is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from flame_ext.errors import InputError
from flame_ext.io.destination import atomic_file, check_destination
from flame_ext.report import LossComparison, bucket_label

__all__ = ["PLOT_SIZE", "check_plot_destination", "matplotlib_missing", "plot_loss", "smooth"]

PLOT_SIZE = (1000, 700)  # pixels of the PNG: 10 x 7 inches at 100 dpi
_DPI = 100


def matplotlib_missing() -> bool:
    """True when matplotlib cannot be imported (the optional ``plot`` extra is not installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def check_plot_destination(path: str | os.PathLike, *, option: str) -> None:
    """Before any work: matplotlib importable, the path a .png that is absent or a previous plot."""
    if matplotlib_missing():
        raise InputError(f"{option} {path}: drawing needs matplotlib: pip install flame-ext[plot]")
    if Path(path).suffix.lower() != ".png":
        raise InputError(f"{option} {path}: the plot is written as PNG; give a file name ending in .png")
    check_destination(path, kind="plot", force=True)  # a previous plot is replaced; anything else is refused


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter at the ends), so single noisy tokens do not hide the trend."""
    n, half = len(values), window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        a, b = max(0, i - half), min(n, i + half + 1)
        out.append((prefix[b] - prefix[a]) / (b - a))
    return out


def plot_loss(cmp: LossComparison, path: str | os.PathLike, *, title: str) -> Path:
    """Draw ``cmp.curve`` (per-position means) into ``path`` atomically; returns the path."""
    if cmp.curve is None:
        raise ValueError("the comparison holds no per-position curve")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    observed, reference = cmp.curve["observed"], cmp.curve["reference"]
    n = len(observed)
    window = max(1, n // 32)
    pos = list(range(n))
    obs_s, ref_s = smooth(observed, window), smooth(reference, window)
    gap = [o - r for o, r in zip(obs_s, ref_s)]
    fig = Figure(figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(pos, obs_s, color="#d62728", lw=2.5, label=f"checkpoint (mean {cmp.observed:.3f})")
    top.plot(pos, ref_s, color="black", lw=1.5, ls="--", label=f"HF reference (mean {cmp.reference:.3f})")
    top.set_ylabel("loss, nats")
    top.legend(loc="best", fontsize=10, framealpha=0.9)
    fig.suptitle(title, fontsize=11)
    bottom.axhspan(-cmp.threshold, cmp.threshold, color="#2ca02c", alpha=0.15, label=f"threshold ±{cmp.threshold:g}")
    bottom.axhline(0.0, color="black", lw=0.8)
    bottom.plot(pos, gap, color="#9467bd", lw=2.5, label=f"checkpoint - reference (mean {cmp.delta:+.3f})")
    bottom.set_ylabel("gap, nats")
    bottom.set_xlabel(f"predicted position (moving average over {window} positions)")
    bottom.legend(loc="best", fontsize=10, framealpha=0.9)
    for b in cmp.by_position:
        for ax in (top, bottom):
            ax.axvline(b["start"], color="grey", lw=0.8, ls=":")
    buckets = top.secondary_xaxis("top")
    buckets.set_xticks([(b["start"] + b["end"] - 1) / 2 for b in cmp.by_position])
    buckets.set_xticklabels([bucket_label(b) for b in cmp.by_position], fontsize=9, color="dimgrey")
    buckets.tick_params(length=0)
    buckets.set_xlabel("position buckets of the report", fontsize=9, color="dimgrey")
    top.set_xlim(0, max(1, n - 1))
    fig.tight_layout()
    with atomic_file(path, kind="plot", force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return Path(path)
