"""Every script in bench/ runs end to end at a tiny size and prints its rows with numbers in them, so that a
refactor cannot break a bench unseen (three were found broken that way). Each runs as a user runs it:
``python bench/NAME.py ...`` in a fresh process, this checkout first on the path. The figures themselves are
not judged here (a smoke run measures nothing worth judging); that every row is there, and a number, is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import titan_version

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?"

# script -> (its tiny arguments, a pattern each printed row must match: the row's name, then a number).
SMOKE: dict[str, tuple[list[str], list[str]]] = {
    "bench_convert.py": (
        ["--size-gb", "0.003", "--repeat", "1", "--cache", "warm"],
        [
            rf"copy \(cp -r\)\s+{NUMBER}",
            rf"copy \+ sync \(durable\)\s+{NUMBER}",
            rf"flame-ext convert\s+{NUMBER}",
            rf"stock \(from_pretrained \+ dcp\.save\)\s+{NUMBER}",
            rf"flame-ext to-hf \(DCP -> HF\)\s+{NUMBER}",
            r"converted checkpoint: \d+ sampled tensors bit-exact",
        ],
    ),
    "bench_diagnose.py": (
        ["--repeat", "1", "--loss-size-gb", "0.003"],
        [
            rf"metadata pass \(no tensor data\): median {NUMBER} ms",
            rf"whole `diagnose` call without --values/--loss: {NUMBER} ms",
            rf"diagnose --loss, {NUMBER} GB bf16 checkpoint, \d+ layers: {NUMBER} s wall, {NUMBER} CPU s, "
            rf"peak RSS {NUMBER} MB",
        ],
    ),
    "bench_fingerprint.py": (
        ["--tiny", "--repeat", "1"],
        [
            rf"with fingerprints\s.*{NUMBER}",
            rf"without\s.*{NUMBER}",
            rf"summation order, largest relative difference .*{NUMBER}",
        ],
    ),
    "bench_guard.py": (
        [],
        [
            rf"whole pre-load check\s+{NUMBER} ms",
            rf"guard's loss probe\s+{NUMBER} ms",
            rf"guarded initial load.*{NUMBER} ms",
        ],
    ),
    "bench_reference.py": (
        ["--size-gb", "0.003", "--skip", "stock"],
        [
            rf"read\s+{NUMBER} s wall",
            rf"no-ref\s+{NUMBER} s wall",
            rf"default\s+{NUMBER} s wall",
            rf"ref-stream\s+{NUMBER} s wall",
            rf"default / no-ref: {NUMBER}x",
        ],
    ),
    "bench_sha256.py": (["--size-gb", "0.003", "--repeat", "1"], [rf"record.*{NUMBER}", rf"files.*{NUMBER}"]),
    "bench_startup.py": (
        ["--repeat", "1", "--no-importtime"],
        [rf"import torch\s+{NUMBER}", rf"convert --no-reference\s+{NUMBER}", rf"diagnose\s+{NUMBER}"],
    ),
    "bench_limits.py": (
        ["--size", "tiny"],
        [
            rf"convert --no-reference vs cat .*{NUMBER}x",
            rf"cold, vs cp \+ sync .*({NUMBER}x|page cache not dropped)",
            rf"to-hf vs convert, 1 rank .*{NUMBER}x",
            rf"diagnose --values vs reading the bytes .*{NUMBER}x",
            rf"diagnose --loss peak RSS vs 2 GB .*{NUMBER}x",
            rf"fingerprint CPU-s/GB vs 0\.4 .*{NUMBER}x",
            rf"start-up above import torch vs 1\.0 s: convert .*{NUMBER}x",
            r"device: cpu.*cuda (absent|present)",
            rf"machine: writing 64 MB of new file data took {NUMBER} CPU s",
        ],
    ),
}
# Under torchrun (process groups): slow, as the other multi-process runs are.
SLOW = {
    "bench_distributed.py": (
        ["--size-gb", "0.003", "--ranks", "1", "2", "--repeat", "1", "--shard-mb", "1"],
        [rf"convert.*{NUMBER}", rf"to-hf.*{NUMBER}"],
    ),
    "bench_loss_gate.py": ([], [rf"\| \(untouched\) \| {NUMBER}"]),
}
# torchtitan 0.3's own models (a layer at a time against torchtitan's whole-state-dict path).
NATIVE = {
    "bench_native_convert.py": (
        ["--sizes", "2x2", "2x4", "--dim", "64"],
        [
            rf"2x2\s+{NUMBER}\s+flame-ext \(streamed\)\s+{NUMBER}",
            rf"2x4\s+{NUMBER}\s+whole state dict\s+{NUMBER}",
            rf"2x4\s+flame-ext / whole\s+{NUMBER}x\s+{NUMBER}x\s+{NUMBER}x",
            rf"peak RSS from 2x2 to 2x4: flame-ext {NUMBER} -> {NUMBER} MB, whole state dict {NUMBER} -> {NUMBER} MB",
        ],
    ),
}
# Not a measurement: draws docs/images/demo-broken-start.png (here into a temporary file).
PLOT = "plot_demo_broken_start.py"
COVERED = {*SMOKE, *SLOW, *NATIVE, PLOT, "bench_resume.py"}  # bench_resume.py: tests/bench/test_bench_resume.py
# These drive the installed torchtitan's own manager, whose API differs between the generations: both environments
# run them. The others' smoke run (the script still runs) needs one environment: .venv-titan01 (``once``).
BOTH_GENERATIONS = {"bench_guard.py", "bench_loss_gate.py"}


def scripts(table: dict) -> list:
    return [pytest.param(s, marks=() if s in BOTH_GENERATIONS else pytest.mark.once("0.1")) for s in sorted(table)]


def run_bench(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=1800
    )


def _assert_rows(proc: subprocess.CompletedProcess, rows: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    missing = [row for row in rows if not re.search(row, proc.stdout)]
    assert not missing, f"rows missing or without a number: {missing}\n{proc.stdout[-3000:]}"


def test_every_bench_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py") if p.name.startswith("bench_") or p.name.startswith("plot_")}
    assert scripts <= COVERED, f"benches without a smoke run: {sorted(scripts - COVERED)}"


# Each bench is a fresh process that generates its checkpoints and times several commands: 40 CPU-s for
# bench_convert.py alone, so the smoke runs are slow (make test runs them, make test-fast does not).
@pytest.mark.slow
@pytest.mark.parametrize("script", scripts(SMOKE))
def test_the_bench_runs_at_a_tiny_size_and_prints_every_row(script, tmp_path):
    args, rows = SMOKE[script]
    _assert_rows(run_bench(script, args, tmp_path), rows)


@pytest.mark.slow
@pytest.mark.parametrize("script", scripts(SLOW))
def test_the_multi_process_bench_runs_at_a_tiny_size(script, tmp_path):
    args, rows = SLOW[script]
    _assert_rows(run_bench(script, args, tmp_path), rows)


@pytest.mark.slow
@pytest.mark.titan03
@pytest.mark.parametrize("script", sorted(NATIVE))
def test_the_native_bench_runs_at_a_tiny_size(script, tmp_path):
    if titan_version() != "0.3":
        pytest.skip("torchtitan 0.3's own models: this environment has torchtitan " + str(titan_version()))
    args, rows = NATIVE[script]
    _assert_rows(run_bench(script, args, tmp_path), rows)


@pytest.mark.slow  # a fresh process that imports matplotlib and draws (6 CPU-s)
@pytest.mark.once("0.1")
def test_the_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "broken-start.png"
    proc = run_bench(PLOT, [str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 1000
