"""The save/resume bench runs end to end at a tiny size, so a change to the managers cannot break it unseen."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_resume.py"


@pytest.mark.slow
def test_the_resume_bench_prints_every_row_with_its_ratios():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--params", "2e6", "--ranks", "1", "--warm-only"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+1\s+(sync|async)", line)]
    assert len(rows) == 2, proc.stdout
    # blocking, total and the warm resume; the cold one empties the page cache, which a test must not do
    assert all(len(re.findall(r"\(x\d+\.\d\d\)", row)) == 3 and "not measured" in row for row in rows), proc.stdout
