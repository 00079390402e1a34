"""Two ranks under torchrun (gloo, FSDP2 via ``fully_shard``): one verdict for all, and no hang on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import valid_report
from support.titan_hosts import titan_generation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"),
]

WORKER = Path(__file__).parent / "dist_worker.py"
DEADLINE = 60.0  # seconds for a failing run to end every rank


def torchrun(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float, list[dict]]:
    """``torchrun --standalone --nproc_per_node=2`` (a free port of its own); each rank's JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "--out",
        str(out),
        *args,
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=DEADLINE + 30)
    elapsed = time.monotonic() - start
    results = [
        json.loads((out / f"rank-{r}.json").read_text()) if (out / f"rank-{r}.json").is_file() else None
        for r in range(2)
    ]
    return proc, elapsed, results


def test_two_ranks_pass_together_on_a_healthy_checkpoint(healthy, tiny_model, tmp_path):
    proc, _, results = torchrun(tmp_path, "--hf", str(tiny_model), "--checkpoint", str(healthy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(r is not None and r["ok"] for r in results), proc.stderr[-3000:]
    losses = [valid_report(r["report"])["loss"] for r in results]
    assert losses[0] == losses[1]  # the same figures on both ranks
    assert abs(losses[0]["delta"]) < 0.01
    # each token's loss, added up over both ranks, matches its reference (pooled, not doubled)
    assert losses[0]["token_delta"] < 1e-4 and losses[0]["token_threshold"] == 0.1
    # every tensor's fingerprint, summed from both ranks' FSDP shards, is the one recorded at conversion
    verified = [line for line in proc.stderr.splitlines() if "verified the values of" in line]
    assert len(verified) == 2 and all("on 2 rank(s): 0 differ" in line for line in verified), verified


def test_two_ranks_stop_a_damage_the_loss_gate_passes(healthy, tiny_model, tmp_path):
    """o_proj scaled by 0.9 moves the step-0 loss by far less than 0.1: only the fingerprints see it."""
    import torch
    from _models import rewrite_dcp

    key = "model.layers.0.self_attn.o_proj.weight"
    damaged = rewrite_dcp(healthy, tmp_path / "scaled", lambda sd: {**sd, key: sd[key] * torch.tensor(0.9)})
    proc, elapsed, results = torchrun(tmp_path / "run", "--hf", str(tiny_model), "--checkpoint", str(damaged))
    assert proc.returncode != 0 and elapsed < DEADLINE, proc.stderr[-3000:]
    assert [r["kinds"] for r in results] == [["value_mismatch"]] * 2, proc.stderr[-3000:]
    for r in results:
        (problem,) = r["report"]["problems"]
        assert problem["key"] == key and "scaled by 0.9" in problem["detail"]
        assert abs(r["report"]["loss"]["delta"]) < 0.1  # the loss gate alone would have let it through


def test_a_broken_checkpoint_ends_both_ranks_within_60s(swapped, tiny_model, tmp_path):
    proc, elapsed, results = torchrun(tmp_path, "--hf", str(tiny_model), "--checkpoint", str(swapped))
    assert proc.returncode != 0 and elapsed < DEADLINE, proc.stderr[-3000:]
    # each rank reached the verdict itself (result written just before it raised) and raised it
    assert [r["kinds"] for r in results] == [["loss_gap", "value_mismatch"]] * 2
    for rank in (0, 1):
        assert f"[rank{rank}]: flame_ext.guard.InitialLoadValidationError" in proc.stderr


def test_a_wrong_buffer_on_one_rank_fails_every_rank(healthy, tiny_model, tmp_path):
    """Only rank 1 has uninitialised RoPE: rank 0 must not carry on alone (it would wait in step 1)."""
    proc, elapsed, results = torchrun(
        tmp_path, "--hf", str(tiny_model), "--checkpoint", str(healthy), "--poison-rank", "1", "--no-repair"
    )
    assert proc.returncode != 0 and elapsed < DEADLINE, proc.stderr[-3000:]
    assert all(r is not None and not r["ok"] for r in results), proc.stderr[-3000:]
    for r in results:
        assert "buffer_mismatch" in r["kinds"]
        details = [p["detail"] for p in r["report"]["problems"] if p["kind"] == "buffer_mismatch"]
        assert all("on rank 1 of 2" in d for d in details)
    assert results[0]["report"] == results[1]["report"]
