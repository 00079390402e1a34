"""The documented CPU walk-through of a native torchtitan start (``docs/torchtitan-native.md``): ``python
configs/titan03_native_cpu.py`` makes a tiny llama3 locally, converts it with ``--layout torchtitan:...``, and runs
torchtitan 0.3's own trainer from it with the guard on; ``--damage`` permutes one q head after conversion. What the
user sees is asserted: the healthy start verified (21 of 21 tensors), the step-0 loss compared and two training
steps, exit 0; the damaged start stopped before step 1 naming the native key, exit non-zero."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.titan_hosts import titan_generation

pytestmark = [
    pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3's trainer and state-dict adapters"),
    pytest.mark.slow,
]

SCRIPT = Path(__file__).parents[2] / "configs" / "titan03_native_cpu.py"
KEY = "layers.1.attention.qkv_linear.wq.weight"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_healthy_native_start_is_verified_and_trains(tmp_path):
    proc = run(tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "verified the values of 21 loaded tensors (of 21) against their recorded fingerprints" in out
    assert "0 differ" in out and "validated (keys, manifest, values, buffers, loss" in out
    step0 = re.search(r"step-0 loss (\S+) vs HF reference (\S+) \(delta (\S+),", out)
    assert step0 and abs(float(step0.group(3))) < 0.01
    assert out.index("validated") < out.index("Training starts at step 1")
    assert re.search(r"step:\s+2\s+loss:", out) and "torchtitan.train exited with 0" in out
    assert (tmp_path / "native-cpu" / "run" / "checkpoint" / "step-2" / "flame_ext.json").is_file()


def test_a_damaged_native_start_is_stopped_naming_the_key(tmp_path):
    proc = run(tmp_path, "--damage")
    out = proc.stdout
    assert proc.returncode != 0, out[-3000:]
    assert f"ERROR   value_mismatch {KEY}: its values are not the ones written at conversion" in out
    assert "failed validation after loading" in out and "Training starts" not in out
    assert not re.search(r"step:\s+1\s", out) and not (tmp_path / "native-cpu" / "run" / "checkpoint").exists()
