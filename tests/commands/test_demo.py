"""``flame-ext demo``, run as a user runs it: exit code and what the output says, checked against itself.

The figures are not copied from a run: the test reads them from the output and checks how they relate
(the broken start's loss far from the reference, the repaired one on it, finite training losses).
"""

from __future__ import annotations

import re
import time

import pytest
from support.cli import run_cli, transformers_major

NUMBER = r"([-+]?(?:\d+\.\d+|nan|inf))"  # uninitialised memory can make the broken start's loss nan or inf


def _floats(pattern: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(pattern.replace("NUM", NUMBER), text)]


@pytest.mark.slow
def test_demo_stops_the_broken_start_and_trains_the_repaired_one(tiny_model, tmp_path):
    (tmp_path / "keep.txt").write_text("user file")  # a reused work folder: the demo replaces only its exp/
    (tmp_path / "exp" / "checkpoint" / "step-0").mkdir(parents=True)
    (tmp_path / "exp" / "checkpoint" / "step-0" / "stale").write_text("from an earlier run")
    started = time.perf_counter()
    proc = run_cli("demo", "--workdir", str(tmp_path), timeout=600)
    elapsed = time.perf_counter() - started
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "demo behaved as expected" in out
    assert all(f"[{i}/4]" in out for i in range(1, 5))
    assert "verdict: OK" in out.split("[3/4]")[0]  # the diagnosis of the converted checkpoint is clean

    broken, repaired = out.split("[3/4]")[1].split("[4/4]")
    if transformers_major() >= 5:
        assert "SIMULATED" in broken  # said out loud: 5.x does not leave the buffer uninitialised by itself
    else:
        assert "real, not simulated" in broken
    assert "the guard stopped the run before step 1" in broken and "buffer_mismatch" in broken
    assert "Training" not in broken and "step 1  loss" not in broken
    assert "--values" not in broken  # the loss problems name the buffers as their cause, not a value check
    assert "caused by the buffer_mismatch above" in broken
    reference = _floats(r"HF reference loss NUM nats", out)[0]
    observed_broken = _floats(r"observed NUM vs HF reference", broken)[0]
    assert not observed_broken - reference <= 0.1  # a real gap (or nan), not an artefact of the check

    assert "guard passed" in repaired and "repaired non-persistent buffer" in repaired
    observed_ok = _floats(r"guard passed: step-0 loss NUM", repaired)[0]
    assert abs(observed_ok - reference) <= 1e-3
    losses = _floats(r"step \d+  loss NUM", repaired)
    assert len(losses) >= 2 and all(0 < x < reference + 0.5 for x in losses)  # training from the loaded weights
    assert (tmp_path / "exp" / "checkpoint" / "step-0" / "flame_ext.json").is_file()
    assert not (tmp_path / "exp" / "checkpoint" / "step-0" / "stale").exists()
    assert (tmp_path / "keep.txt").read_text() == "user file"
    # No warning caused by flame-ext itself: huggingface_hub's "Cannot enable progress bars" came three times,
    # flame-ext turning on the bars its own HF_HUB_DISABLE_PROGRESS_BARS had turned off.
    assert "Warning" not in proc.stderr and "Cannot enable progress bars" not in proc.stderr, proc.stderr
    assert elapsed < 120, f"demo took {elapsed:.0f} s"  # `flame-ext demo` promises under a minute on 2 idle cores
