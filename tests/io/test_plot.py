"""The per-position loss plot: a real PNG of the promised size, written atomically, refused where it would
replace something that is not a plot, and a clear message without matplotlib."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from PIL import Image

from flame_ext.errors import DestinationError, InputError
from flame_ext.io.plot import PLOT_SIZE, check_plot_destination, plot_loss, smooth
from flame_ext.report import LossComparison


def _comparison(kind: str, n: int = 255) -> LossComparison:
    """A reference curve and a checkpoint that is off: by a gap rising with position (a RoPE fault) or by the
    same amount everywhere (a wrong weight elsewhere)."""
    reference = [2.0 + 0.3 * math.sin(i / 9) for i in range(n)]
    offset = (lambda i: 1.5 * i / n) if kind == "rope" else (lambda i: 0.7)
    observed = [r + offset(i) for i, r in enumerate(reference)]
    edges = [0, 64, 128, 191, n]
    buckets = [
        {
            "start": a,
            "end": b,
            "observed": sum(observed[a:b]) / (b - a),
            "reference": sum(reference[a:b]) / (b - a),
        }
        for a, b in zip(edges, edges[1:])
    ]
    cmp = LossComparison(sum(reference) / n, sum(observed) / n, 0.1, buckets, observed[0] - reference[0])
    cmp.curve = {"observed": observed, "reference": reference}
    return cmp


@pytest.mark.parametrize("kind", ["rope", "shift"])
def test_png_of_the_expected_size(kind, tmp_path):
    out = plot_loss(_comparison(kind), tmp_path / f"{kind}.png", title=kind)
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kind}.png"]  # nothing left beside it


def test_a_previous_plot_is_replaced_and_anything_else_refused(tmp_path):
    plot = tmp_path / "loss.png"
    plot_loss(_comparison("rope"), plot, title="first")
    first = plot.read_bytes()
    plot_loss(_comparison("shift"), plot, title="second")
    assert plot.read_bytes() != first
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(DestinationError, match="notes.png.*not a PNG image"):
        check_plot_destination(notes, option="--plot")
    with pytest.raises(InputError, match="ending in .png"):
        check_plot_destination(tmp_path / "loss.pdf", option="--plot")
    assert notes.read_text() == "not an image"


def test_smoothing_keeps_a_trend_and_flattens_noise():
    noisy = [float(i % 2) for i in range(100)]
    assert all(abs(v - 0.5) < 0.2 for v in smooth(noisy, 8)[4:-4])
    assert smooth(list(range(10)), 1) == list(range(10))


def test_without_matplotlib_the_message_says_what_to_install(tmp_path):
    """A fresh interpreter where matplotlib cannot be imported: one line, exit 2, pip install flame-ext[plot]."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from flame_ext.cli import main\n"
        f"sys.exit(main(['diagnose', '--checkpoint', {str(tmp_path)!r}, '--loss', '--plot', 'x.png']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "--plot x.png" in lines[0] and "pip install flame-ext[plot]" in lines[0]
    assert not (tmp_path / "x.png").exists()
